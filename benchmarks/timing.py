"""Timing two callables side by side: the interleaved loop every comparison benchmark shares.

On a shared machine the load changes from one second to the next, so the two sides of a
comparison run alternately in one process (the order flips every round, so neither side always
runs right after the other's cache-thrashing pass) and each sees the same machine. Callers
reduce the times as they need: speed.py takes the median, inference.py the minimum (the run the
scheduler did not interrupt).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved(ours: Callable[[], object], theirs: Callable[[], object], repeats: int,
                warmup: int = 2, min_seconds: float = 1.0, max_repeats: int = 2000,
                clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float]]:
    """The seconds of every run of each callable, run alternately.

    At least ``repeats`` runs each, more until each side has run ``min_seconds`` in total (a
    sub-millisecond case needs hundreds of runs for a stable statistic), at most ``max_repeats``.
    ``clock``: wall time by default; ``time.process_time`` counts only this process's CPU time,
    which with one thread leaves out the time other processes held the core.
    """
    for _ in range(warmup):
        ours()
        theirs()
    ours_times: list[float] = []
    their_times: list[float] = []
    pairs = ((ours, ours_times), (theirs, their_times))
    rounds = 0
    while rounds < max_repeats and (
            min(len(ours_times), len(their_times)) < repeats
            or min(sum(ours_times), sum(their_times)) < min_seconds):
        for fn, times in pairs if rounds % 2 == 0 else pairs[::-1]:
            start = clock()
            fn()
            elapsed = clock() - start
            # A run of no time at all is a clock that did not advance (the process CPU-time
            # clock did so once in a ~100 µs step on the Firecracker VM, 2026-12-01), not a
            # measurement: as the minimum it would make a ratio 0 or infinite.
            if elapsed > 0:
                times.append(elapsed)
        rounds += 1
    if not ours_times or not their_times:
        raise RuntimeError(f"the clock did not advance in {rounds} rounds: nothing measured")
    return ours_times, their_times
