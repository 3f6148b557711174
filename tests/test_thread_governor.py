"""The thread governor: sheds torch's intra-op threads while other processes hold the cores."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.engine import threads
from rnnkit.engine.threads import ThreadGovernor, running_elsewhere


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def governor(busy: list[int], cores: int = 2, policy: str = "adaptive"):
    clock = FakeClock()
    samples = iter(busy)
    gov = ThreadGovernor(cores=cores, sample=lambda: next(samples), clock=clock, policy=policy)
    return gov, clock


def step(gov: ThreadGovernor, clock: FakeClock, times: int) -> int:
    threads_now = 0
    for _ in range(times):
        clock.now += threads.SAMPLE_SECONDS
        threads_now = gov.adapt()
    return threads_now


def test_quiet_machine_keeps_the_requested_threads(restore_threads):
    torch.set_num_threads(2)
    gov, clock = governor([0] * 10)
    assert step(gov, clock, 5) == 2 and torch.get_num_threads() == 2


def test_a_busy_core_sheds_a_thread_and_it_comes_back_when_free(restore_threads):
    torch.set_num_threads(2)
    gov, clock = governor([1] * 5 + [0] * 5)
    assert step(gov, clock, 5) == 1
    assert torch.get_num_threads() == 1  # what torch's ops and rnnkit's kernels read
    assert step(gov, clock, 5) == 2
    assert torch.get_num_threads() == 2


def test_a_moment_of_other_work_does_not_shed(restore_threads):
    torch.set_num_threads(2)
    gov, clock = governor([0, 0, 2, 0, 0, 0])  # e.g. a compiler starting and ending
    assert [step(gov, clock, 1) for _ in range(6)] == [2] * 6


def test_never_more_than_requested_and_user_changes_are_adopted(restore_threads):
    torch.set_num_threads(1)
    gov, clock = governor([0] * 10, cores=8)
    assert step(gov, clock, 3) == 1  # 8 free cores, but the user asked for 1
    torch.set_num_threads(2)  # the user changes their mind
    assert step(gov, clock, 3) == 2
    assert gov.requested == 2


def test_samples_are_rate_limited(restore_threads):
    torch.set_num_threads(2)
    calls = []
    clock = FakeClock()
    gov = ThreadGovernor(cores=2, sample=lambda: calls.append(1) or 0, clock=clock)
    for _ in range(100):
        gov.adapt()  # no time passes: one sample only
    assert len(calls) == 1


def test_one_requested_thread_is_never_sampled(restore_threads):
    calls = []
    clock = FakeClock()
    gov = ThreadGovernor(cores=2, sample=lambda: calls.append(1) or 1, clock=clock)
    torch.set_num_threads(1)  # nothing to shed: the /proc reads would be pure cost
    assert step(gov, clock, 5) == 1 and calls == []
    torch.set_num_threads(2)  # asking for more turns sampling (and shedding) on
    assert step(gov, clock, 5) == 1 and len(calls) == 5 and gov.requested == 2


def test_fixed_policy_and_missing_proc_leave_torch_alone(restore_threads):
    torch.set_num_threads(2)
    gov, clock = governor([1] * 10, policy="fixed")
    assert step(gov, clock, 5) == 2
    gov = ThreadGovernor(cores=2, sample=lambda: None, clock=FakeClock())
    assert gov.adapt() == 2 and gov.policy == "fixed"


def test_bad_policy_names_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown thread policy 'fast'"):
        threads.set_policy("fast")
    with pytest.warns(RuntimeWarning, match="RNNKIT_THREADS='fast'"):
        ThreadGovernor(policy="fast")


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_running_elsewhere_sees_a_real_busy_process():
    before = running_elsewhere()
    assert before is not None and before >= 0
    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        time.sleep(0.3)
        seen = [running_elsewhere() for _ in range(20) if time.sleep(0.01) is None]
        assert max(seen) >= 1  # the busy loop is always runnable
    finally:
        busy.kill()
        busy.wait()


def test_layers_consult_the_governor(monkeypatch, restore_threads):
    calls = []
    monkeypatch.setattr(threads.GOVERNOR, "adapt", lambda: calls.append(1) or 1)
    x = torch.randn(5, 2, 3)
    for layer in (rnnkit.LSTM(3, 4), rnnkit.GRU(3, 4), rnnkit.LSTM(3, 4, peephole=True)):
        calls.clear()
        layer(x)
        assert calls, type(layer).__name__


def test_the_thread_count_is_readable_while_torch_compile_traces(restore_threads):
    # the plain LSTM's route (torch's op or rnnkit's kernel) depends on the thread count, and
    # torch.compile(fullgraph=True) cannot call torch.get_num_threads
    from rnnkit.engine import fused

    torch.set_num_threads(1)
    assert threads.current_threads() == 1

    def route(x: torch.Tensor) -> torch.Tensor:
        return x + int(fused.own_kernel_faster(100, 32, 256)) + threads.current_threads()

    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    assert torch.equal(compiled(x), route(x))
