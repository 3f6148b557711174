"""The command line's thread choice: the cores other processes leave free (issue 17, item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnkit.train import threads
from rnnkit.train.threads import (
    choose_threads,
    cores_used_by_others,
    cpu_ticks,
    threads_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _stat(path: Path, user: int, idle: int) -> Path:
    # user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {user} 0 10 {idle} 5 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    return path


def test_cpu_ticks_reads_busy_and_total_from_proc_stat(tmp_path: Path) -> None:
    assert cpu_ticks(_stat(tmp_path / "stat", user=100, idle=300)) == (110, 415)
    assert cpu_ticks(tmp_path / "absent") is None


def test_other_processes_share_excludes_this_process() -> None:
    # 2 cores over 200 ticks: 150 busy, 50 of them ours -> others used 1 core
    assert cores_used_by_others((0, 0), (150, 200), own=50, cores=2) == pytest.approx(1.0)
    assert cores_used_by_others((0, 0), (40, 200), own=60, cores=2) == 0.0  # never negative
    assert cores_used_by_others((5, 9), (5, 9), own=0, cores=2) == 0.0  # no time passed


@pytest.mark.parametrize(("others", "expected"), [(0.0, 2), (0.3, 2), (0.7, 1), (1.0, 1),
                                                  (1.9, 1), (3.5, 1)])
def test_threads_for_leaves_the_busy_cores_to_their_owners(others: float, expected: int) -> None:
    assert threads_for(default=2, cores=2, others=others) == expected


def test_threads_for_never_exceeds_torch_default() -> None:
    assert threads_for(default=4, cores=8, others=0.0) == 4
    assert threads_for(default=4, cores=8, others=5.0) == 3


def test_requested_and_omp_num_threads_win(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = choose_threads(3)
    assert (choice.threads, choice.automatic, torch.get_num_threads()) == (3, False, 3)
    assert choice.line() == "threads: 3 threads (--threads)"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert choose_threads(None).reason == "OMP_NUM_THREADS"


def test_no_proc_stat_keeps_torch_default(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "PROC_STAT", tmp_path / "absent")
    choice = choose_threads(None, default=2)
    assert choice.threads == 2 and not choice.automatic and "no /proc/stat" in choice.reason


@pytest.mark.skipif(not Path("/proc/stat").exists() or (os.cpu_count() or 1) < 2,
                    reason="needs Linux's /proc/stat and at least 2 cores")
def test_a_busy_process_takes_a_thread_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = os.cpu_count() or 2
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        choice = choose_threads(None, sample_seconds=0.5, default=cores)
    finally:
        busy.kill()
        busy.wait()
    # the loop keeps a whole core busy; on a machine shared with more work, others use more
    assert choice.automatic and choice.threads <= cores - 1
    assert "--threads N overrides" in choice.line() and "busy" in choice.reason
    assert torch.get_num_threads() == choice.threads
