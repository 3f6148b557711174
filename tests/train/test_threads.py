"""The command line's thread choice: the engine governor's first full sample, reported (issue 17,
item 1); the measuring itself is tested with the governor (tests/test_thread_governor.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnkit.engine.threads import ThreadGovernor
from rnnkit.train.threads import choose_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_governor(busy: list[int], cores: int = 2, policy: str = "adaptive") -> ThreadGovernor:
    samples = iter(busy)
    return ThreadGovernor(cores=cores, sample=lambda: next(samples), clock=lambda: 0.0,
                          policy=policy)


@pytest.fixture
def no_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_requested_and_omp_num_threads_win(monkeypatch, restore_threads) -> None:
    choice = choose_threads(3, fake_governor([]))
    assert (choice.threads, choice.automatic, torch.get_num_threads()) == (3, False, 3)
    assert choice.line() == "threads: 3 threads (--threads)"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert choose_threads(None, fake_governor([])).line() == "threads: 1 thread (OMP_NUM_THREADS)"


def test_a_busy_core_takes_a_thread_away_before_the_first_step(no_omp, restore_threads) -> None:
    torch.set_num_threads(2)
    governor = fake_governor([1, 1, 0, 1, 1], cores=2)  # a moment of quiet does not count
    choice = choose_threads(None, governor)
    assert choice.automatic and choice.threads == 1 == torch.get_num_threads()
    assert choice.line() == ("threads: 1 thread (other processes keep 1 of 2 cores busy; "
                             "torch's default 2 would oversubscribe them); --threads N overrides")


def test_a_quiet_machine_keeps_torch_default(no_omp, restore_threads) -> None:
    torch.set_num_threads(2)
    choice = choose_threads(None, fake_governor([0] * 5))
    assert choice.threads == 2 and choice.reason == ("torch's default: other processes keep 0 "
                                                     "of 2 cores busy")


def test_recheck_reports_what_the_governor_changed(no_omp, restore_threads) -> None:
    torch.set_num_threads(2)
    governor = fake_governor([0] * 5 + [1] * 5, cores=2)
    choice = choose_threads(None, governor)
    assert choice.threads == 2 and choice.recheck() is None
    for _ in range(5):  # layer calls while another process holds a core
        governor._next_sample = 0.0
        governor.adapt()
    assert choice.recheck() == ("threads: now 1 (other processes keep 1 of 2 cores busy; "
                                "torch's default 2 would oversubscribe them)")
    assert choice.recheck() is None  # reported once


def test_fixed_policy_and_missing_proc(no_omp, restore_threads) -> None:
    torch.set_num_threads(2)
    choice = choose_threads(None, fake_governor([1] * 5, policy="fixed"))
    assert choice.threads == 2 and not choice.automatic and "RNNKIT_THREADS=fixed" in choice.line()
    blind = ThreadGovernor(cores=2, sample=lambda: None, clock=lambda: 0.0)
    choice = choose_threads(None, blind)
    assert choice.threads == 2 and "no /proc" in choice.reason


@pytest.mark.skipif(not Path("/proc/stat").exists() or (os.cpu_count() or 1) < 2,
                    reason="needs Linux's /proc and at least 2 cores")
def test_a_real_busy_process_takes_a_thread_away(no_omp, restore_threads) -> None:
    cores = os.cpu_count() or 2
    torch.set_num_threads(cores)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        choice = choose_threads(None, ThreadGovernor(cores=cores))
    finally:
        busy.kill()
        busy.wait()
    # the loop keeps a core busy; on a machine shared with more work, others use more
    assert choice.automatic and choice.threads <= cores - 1
    assert "--threads N overrides" in choice.line() and "busy" in choice.reason
    assert torch.get_num_threads() == choice.threads
