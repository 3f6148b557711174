"""benchmarks/timing.py: the interleaved loop every comparison benchmark shares."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "timing.py"


def _timing():
    spec = importlib.util.spec_from_file_location("benchmark_timing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StallingClock:
    """A clock that advances 1.0 per reading, except that every third run it does not move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        run, second = divmod(self.readings - 1, 2)
        if second == 1 and run % 3 == 2:
            return self.now  # the end of this run reads the start's value
        self.now += 1.0
        return self.now


def test_a_run_the_clock_did_not_see_is_not_a_time() -> None:
    """inference.py once divided by a minimum of 0 s: a CPU-time clock that did not advance over
    a run. Such runs are dropped, so a minimum is a real time."""
    ours, theirs = _timing().interleaved(lambda: None, lambda: None, repeats=10, warmup=0,
                                         min_seconds=0.0, clock=StallingClock())
    assert len(ours) >= 10 and len(theirs) >= 10
    assert min(ours) > 0 and min(theirs) > 0


def test_a_clock_that_never_advances_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="did not advance"):
        _timing().interleaved(lambda: None, lambda: None, repeats=3, warmup=0, min_seconds=0.0,
                              max_repeats=5, clock=lambda: 0.0)
