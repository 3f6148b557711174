"""Crash-safe, symlink-safe file writes into a run directory.

Every file a run writes (checkpoints, ``best.json``, ``config.yaml``, ``curves.png``, MIDI, ...)
goes through :func:`write_bytes`: a fresh temporary file created with ``O_EXCL`` in the target
directory (``tempfile.mkstemp``: an unpredictable name that cannot be a planted symlink), written,
fsynced, then ``os.replace``-d over the target. ``os.replace`` swaps the directory entry, so a
symlink planted at the target is replaced, never written through. Readers see the old or the new
file, never a mix; on any failure the temporary file is removed and :class:`RunWriteError` says
what happened in one line (disk full, file-size limit, permission, ...).

The temporary files are named ``.<name>.tmp-<pid>-<random>``; a process killed between creating
and renaming one leaves it behind, and :func:`remove_stale_temps` removes those of dead processes.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import time
from pathlib import Path

from rnnkit.train.errors import RunWriteError

# the temporary files this module creates (and the older ``.<name>.tmp-<pid>`` form)
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")
# test hook for the fault tests: seconds to sleep with the temporary file written but not yet
# renamed, so that a ``kill -9`` can land inside a checkpoint write
SLEEP_ENV = "RNNKIT_FAULT_SLEEP_IN_WRITE"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600; a run's files get the permissions ``open(path, "w")`` would give them
FILE_MODE = 0o666 & ~_umask()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data itself is synced
    finally:
        os.close(fd)


def describe_os_error(error: OSError, path: Path) -> str:
    """One line for a failed write: disk full, file-size limit, or the system's reason."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {path}"
    if error.errno == errno.EFBIG:
        return f"file size limit reached while writing {path}"
    return f"cannot write {path}: {error.strerror or error}"


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _FULL


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` so readers see the old or the new file, never a mix."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as error:
        raise RunWriteError(describe_os_error(error, path)) from None
    tmp = Path(tmp_name)
    try:
        try:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        delay = os.environ.get(SLEEP_ENV)
        if delay:
            time.sleep(float(delay))
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise RunWriteError(describe_os_error(error, path)) from None
    except BaseException:  # KeyboardInterrupt, SystemExit: leave no partial file either
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def open_append(path: str | Path, fresh: bool) -> int:
    """A file descriptor appending to ``path`` (created anew when ``fresh``), never through a
    symlink: a planted one is refused (ELOOP) or, when ``fresh``, removed first."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        if fresh:
            path.unlink(missing_ok=True)  # removes a symlink itself, not what it names
            flags |= os.O_EXCL
        fd = os.open(path, flags, 0o666)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunWriteError(f"{path} is not a regular file; refusing to write into it")
        return fd
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RunWriteError(f"{path} is a symbolic link; refusing to write through it") from None
        raise RunWriteError(describe_os_error(error, path)) from None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(directory: str | Path, everything: bool = False) -> list[Path]:
    """Removes the temporary files of :func:`write_bytes` that a killed process left in
    ``directory``: those whose process is gone, or (``everything``, on resume: the run
    directory is then ours alone) all of them. Only this module's name pattern is touched."""
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not (everything or not _pid_alive(pid)):
            continue  # ours (in flight) or a live process's
        try:
            if entry.is_symlink() or entry.is_file():  # a planted directory is left alone
                entry.unlink()
                removed.append(entry)
        except OSError:
            pass
    return removed
