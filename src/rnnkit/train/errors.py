"""The errors of checkpoints and run files, in one module so the writer and the reader share them."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, truncated, tampered with or of another format."""


class RunWriteError(CheckpointError):
    """A file of a run could not be written (disk full, a size limit, permission, a planted
    symlink); the partial file is removed and the previous version of the file is intact."""
