"""Metrics as JSON lines: one object per record, ``kind`` = "train" (every step) or "valid"."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from rnnkit.train.atomic import describe_os_error, open_append, write_text
from rnnkit.train.errors import CheckpointError, RunWriteError


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file. A last line without its newline is the record a killed
    process was writing: it is left out (the resumed run writes it again)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    lines.pop()  # "" after the final newline, or the partial line of a kill
    records = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise CheckpointError(f"{path} line {number} is not a metrics record (JSON object)")
        records.append(record)
    return records


class MetricsLog:
    """Appends records; on resume, drops those past the checkpoint's step so nothing is doubled.

    The records up to a checkpoint are on disk before the checkpoint is (:meth:`flush` with
    ``sync``), so after a kill the resumed run keeps them, drops the ones after, and its
    deterministic replay writes those again: the file ends as an uninterrupted run's would."""

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        if keep_until_step is not None:
            if path.is_symlink():
                raise RunWriteError(f"{path} is a symbolic link; refusing to read or write it")
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until_step]
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        fd = open_append(path, fresh=keep_until_step is None)
        self._handle: TextIO = os.fdopen(fd, "a", encoding="utf-8")

    def _failed(self, error: OSError) -> RunWriteError:
        return RunWriteError(describe_os_error(error, self.path))

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise self._failed(error) from None

    def flush(self, sync: bool = False) -> None:
        """Writes the buffered records out; ``sync``: also to the disk (before a checkpoint)."""
        try:
            self._handle.flush()
            if sync:
                os.fsync(self._handle.fileno())
        except OSError as error:
            raise self._failed(error) from None

    def close(self, quiet: bool = False) -> None:
        """Flushes and closes; ``quiet``: a failure is not raised (another error is on its way)."""
        if self._handle.closed:
            return
        try:
            self._handle.close()
        except OSError as error:
            if not quiet:
                raise self._failed(error) from None
