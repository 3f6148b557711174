"""How many CPU threads a run uses: what is actually free on the machine, not its core count.

torch's default is one thread per core. On a machine where other processes keep cores busy that
default oversubscribes them: the threads of one parallel op wait for each other at every
barrier, and a charlm step measured 5× slower with 2 threads than with 1 while another process
kept one of 2 cores busy (issue 17). So the command line measures the cores other processes use
(the CPU time they took in ``/proc/stat`` over a short window, minus this process's own) and
takes the free ones; where nothing else runs it keeps torch's default. The trainer re-checks at
its validations (:meth:`ThreadChoice.recheck`), since other work starts and stops during a run.

Linux only (``/proc/stat``); elsewhere torch's default is kept and the reason says why.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.3  # long enough for the kernel's 10 ms tick to average over, short at start-up
# a core counts as busy when others use more than this fraction of it (a shell, an editor and
# the kernel's own work take a few percent without slowing a thread down)
BUSY_SHARE = 0.5


def cpu_ticks(stat: Path | None = None) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot from ``/proc/stat``'s ``cpu`` line, or None
    where there is no such file. Idle and iowait are not busy; guest time is already inside
    user and nice, so the first eight columns are the total."""
    try:
        with (stat or PROC_STAT).open() as lines:
            first = lines.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) < 5:
        return None
    values = [int(v) for v in first[1:9]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def own_ticks() -> float:
    """This process's CPU time (all its threads) in jiffies, comparable with :func:`cpu_ticks`."""
    return time.process_time() * os.sysconf("SC_CLK_TCK")


def cores_used_by_others(before: tuple[int, int], after: tuple[int, int], own: float,
                         cores: int) -> float:
    """Cores' worth of CPU the other processes used between two :func:`cpu_ticks` samples,
    given this process's own ticks over the same window."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return 0.0
    return max(0.0, (busy - own) / total * cores)


def threads_for(default: int, cores: int, others: float) -> int:
    """torch's ``default`` thread count, less the cores others keep busy (at least one)."""
    busy = int(others + (1 - BUSY_SHARE))  # rounds a share above BUSY_SHARE up to a whole core
    return max(1, min(default, cores - busy))


@dataclass
class ThreadChoice:
    """The thread count of a run, why, and (when chosen from the load) its re-checks."""

    threads: int
    reason: str
    automatic: bool  # chosen from the load: re-checked during the run
    cores: int = 1
    default: int = 1
    _last: tuple[int, int] | None = field(default=None, repr=False)
    _own: float = field(default=0.0, repr=False)

    def line(self) -> str:
        """The start-up line: the choice, why, and how to override it."""
        how = "; --threads N overrides" if self.automatic else ""
        plural = "s" if self.threads != 1 else ""
        return f"threads: {self.threads} thread{plural} ({self.reason}){how}"

    def recheck(self) -> str | None:
        """Re-measures the load since the last measure and applies a changed choice; returns a
        line saying so, or None when the count stays."""
        if not self.automatic or self._last is None:
            return None
        now, own = cpu_ticks(), own_ticks()
        if now is None:
            return None
        others = cores_used_by_others(self._last, now, own - self._own, self.cores)
        self._last, self._own = now, own
        threads = threads_for(self.default, self.cores, others)
        if threads == self.threads:
            return None
        import torch

        torch.set_num_threads(threads)
        self.threads, self.reason = threads, _load_reason(others, self.cores, self.default,
                                                          threads)
        return f"threads: now {threads} ({self.reason})"


def _load_reason(others: float, cores: int, default: int, threads: int) -> str:
    if threads == default:
        return f"torch's default: other processes use {others:.1f} of {cores} cores"
    return (f"other processes keep {others:.1f} of {cores} cores busy; torch's default "
            f"{default} would oversubscribe them")


def choose_threads(requested: int | None, sample_seconds: float = SAMPLE_SECONDS,
                   default: int | None = None) -> ThreadChoice:
    """The run's thread count, applied to torch: ``requested`` (``--threads``) if given, else
    ``OMP_NUM_THREADS`` if set (torch already honours it), else ``default`` (torch's own count)
    less the cores other processes keep busy over ``sample_seconds``."""
    import torch

    if requested is not None:
        torch.set_num_threads(requested)
        return ThreadChoice(requested, "--threads", automatic=False)
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(torch.get_num_threads(), "OMP_NUM_THREADS", automatic=False)
    default = default or torch.get_num_threads()
    cores = os.cpu_count() or default
    if default == 1:  # nothing to take away: no need to measure
        return ThreadChoice(1, "torch's default here", automatic=False)
    before, own = cpu_ticks(), own_ticks()
    if before is None:
        return ThreadChoice(default, "torch's default; no /proc/stat to measure the load",
                            automatic=False)
    time.sleep(sample_seconds)
    after, own_after = cpu_ticks(), own_ticks()
    assert after is not None
    others = cores_used_by_others(before, after, own_after - own, cores)
    threads = threads_for(default, cores, others)
    torch.set_num_threads(threads)
    return ThreadChoice(threads, _load_reason(others, cores, default, threads), automatic=True,
                        cores=cores, default=default, _last=after, _own=own_after)
