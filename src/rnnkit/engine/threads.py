"""Intra-op threads on a busy machine: shed threads while other processes hold the cores.

Why: a recurrent layer's time loop meets its threads at a barrier every step. When another
process keeps one of the cores busy, the scheduler parks one of our threads behind it for a time
slice, and every step waits for it: measured on the 2-core CI machine kind with one core busy,
forward+backward at T,B,H = 35,20,200 took 792 ms with 2 threads against 23 ms with 1 for
``nn.LSTM`` (torch's oneDNN op), 309 vs 31 ms for rnnkit's plain LSTM, 30 vs 16 ms for its
peephole kernel. One thread per free core avoids the collapse; a thread more than that buys it.

How: every rnnkit layer call asks :func:`adapt` (free: a clock read) and, at most every
``SAMPLE_SECONDS``, it samples how many tasks *other* processes have running now — the kernel's
``procs_running`` (``/proc/stat``) minus this process's own running threads
(``/proc/self/task/*/stat``). The median of the last ``WINDOW`` samples (so a compiler flickering
for a moment does not count) gives the free cores, and torch's intra-op thread count is set to
``min(requested, free)`` — the same setting torch's own ops and rnnkit's kernels read, forward
and backward. When the other work ends the count goes back up.

``requested`` is the thread count the user asked for (``torch.set_num_threads``, the CLI's
``--threads``): rnnkit never uses more, and a change the user makes later is adopted as the new
request. ``RNNKIT_THREADS=fixed`` (or :func:`set_policy`) turns the adaptation off; where
``/proc`` does not exist (macOS, Windows) it is off by construction.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from rnnkit.native import tracing

POLICY_ENV = "RNNKIT_THREADS"
POLICIES = ("adaptive", "fixed")
SAMPLE_SECONDS = 0.05
WINDOW = 5


def running_elsewhere(proc: Path = Path("/proc")) -> int | None:
    """Tasks of other processes running or runnable right now; None without ``/proc``."""
    try:
        with open(proc / "stat", encoding="ascii") as fh:
            running = next(int(line.split()[1]) for line in fh if line.startswith("procs_running"))
        own = 0
        for task in (proc / "self" / "task").iterdir():
            try:
                stat = (task / "stat").read_text(encoding="ascii", errors="replace")
            except OSError:  # the thread ended between the listing and the read
                continue
            # the state follows the command name, which is in parentheses and may hold spaces
            if stat[stat.rfind(")") + 2: stat.rfind(")") + 3] == "R":
                own += 1
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(0, running - own)


class ThreadGovernor:
    """Sets torch's intra-op thread count to the cores other processes leave free."""

    def __init__(self, cores: int | None = None,
                 sample: Callable[[], int | None] = running_elsewhere,
                 clock: Callable[[], float] = time.monotonic,
                 policy: str | None = None) -> None:
        self.cores = cores or os.cpu_count() or 1
        self._sample = sample
        self._clock = clock
        self.policy = policy or os.environ.get(POLICY_ENV, "adaptive")
        if self.policy not in POLICIES:  # (read at import: a warning, not an import error)
            warnings.warn(f"{POLICY_ENV}={self.policy!r} is not one of {', '.join(POLICIES)}; "
                          "using 'adaptive'", RuntimeWarning, stacklevel=2)
            self.policy = "adaptive"
        self._samples: deque[int] = deque(maxlen=WINDOW)
        self._next_sample = 0.0
        self._requested: int | None = None  # what the user asked torch for
        self._applied: int | None = None  # what this governor last set

    @property
    def requested(self) -> int:
        return self._requested if self._requested is not None else torch.get_num_threads()

    def free_cores(self) -> int | None:
        """Cores the other processes left free, by the median of the recent samples."""
        busy = self.busy_cores()
        return None if busy is None else max(1, self.cores - busy)

    def adapt(self) -> int:
        """The thread count for the next call (torch's setting, changed if it must be)."""
        now = self._clock()
        if self.policy == "fixed" or now < self._next_sample:
            return torch.get_num_threads()
        self._next_sample = now + SAMPLE_SECONDS
        current = torch.get_num_threads()
        if self._applied is None or current != self._applied:
            self._requested = current  # first call, or the user set a new count since
        if self.requested == 1:  # nothing to shed, so no sample: its /proc reads cost 0.14-0.25
            self._applied = current  # ms, a few % of a 7 ms layer call (s13, 35,20,200 LSTM)
            return current
        busy = self._sample()
        if busy is None:  # no /proc: nothing to measure, leave torch's setting alone
            self.policy = "fixed"
            return current
        self._samples.append(busy)
        threads = min(self.requested, self.free_cores() or self.requested)
        if threads != current:
            torch.set_num_threads(threads)
        self._applied = threads
        return threads

    def settle(self, sleep: Callable[[float], None] = time.sleep) -> int:
        """Takes a full window of samples now (``WINDOW`` × ``SAMPLE_SECONDS``, a quarter of a
        second) and applies them: a run's start-up choice, so its first steps and its first line
        already follow the load instead of starting from torch's default."""
        for index in range(WINDOW):
            if index:
                sleep(SAMPLE_SECONDS)
            self._next_sample = 0.0  # sample now, whatever the clock says
            self.adapt()
        return torch.get_num_threads()

    def busy_cores(self) -> int | None:
        """Tasks other processes keep running, by the median of the recent samples (None before
        the first sample, or without ``/proc``)."""
        if not self._samples:
            return None
        return int(statistics.median(self._samples))

    def release(self) -> None:
        """Gives the user's own thread count back (policy changes, tests)."""
        if (self._applied is not None and self._requested is not None
                and torch.get_num_threads() == self._applied):
            torch.set_num_threads(self._requested)
        self._applied = None
        self._requested = None
        self._samples.clear()
        self._next_sample = 0.0


GOVERNOR = ThreadGovernor()


def current_threads() -> int:
    """torch's intra-op thread count, also while torch.compile traces (which cannot call
    ``torch.get_num_threads``): then the count the last eager call saw."""
    global _LAST_SEEN
    if tracing():
        return _LAST_SEEN
    _LAST_SEEN = torch.get_num_threads()
    return _LAST_SEEN


_LAST_SEEN = torch.get_num_threads()


def adapt() -> int | None:
    """Called by the engine before each layer call; see the module docstring. Not while
    torch.compile traces (a compiled graph cannot read clocks and /proc; the eager calls around
    it keep the count up to date): None then."""
    if tracing():
        return None
    return GOVERNOR.adapt()


def set_policy(policy: str) -> None:
    """``"adaptive"`` (default: shed threads under contention) or ``"fixed"`` (torch's setting
    as the user left it)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown thread policy {policy!r}; expected one of {', '.join(POLICIES)}")
    GOVERNOR.release()
    GOVERNOR.policy = policy


def get_policy() -> str:
    return GOVERNOR.policy
