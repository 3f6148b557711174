"""The "budget" learning-rate schedule: the full rate for a share of the budget, then a geometric
decay that ends at budget_final × the rate when the binding budget (steps or minutes) runs out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import make_trainer

from rnnkit.options import OptionError
from rnnkit.train import load_checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.trainer import BudgetSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = dict(schedule="budget", budget_hold=0.2, budget_final=0.01, lr=1.0, eval_every=5)


def expected(progress: float) -> float:
    """The rate at ``progress``, written out independently of BudgetSchedule.multiplier."""
    if progress <= 0.2:
        return 1.0
    return 0.01 ** ((progress - 0.2) / 0.8)


def _rates(trainer: Any, stop_at: int | None = None) -> list[float]:
    rates: list[float] = []

    def record(t: Any, step: dict[str, Any]) -> None:
        rates.append(step["lr"])  # the rate this step ran with
        if t.step == stop_at:
            t.request_stop()

    trainer.on_step = record
    return rates


def test_step_budget_holds_then_decays_geometrically() -> None:
    trainer = make_trainer(steps=10, **BUDGET)
    rates = _rates(trainer)
    trainer.fit()
    # step k runs at the progress after k - 1 of the 10 steps
    assert rates == pytest.approx([expected(k / 10) for k in range(10)], rel=1e-12)
    assert rates[:3] == [1.0, 1.0, 1.0] and rates[-1] < rates[-2] < rates[3] < 1.0
    # the rate the run would go on with is the final one
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_minutes_budget_decays_with_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from rnnkit.train import trainer as trainer_module

    ticks = iter(range(0, 10_000, 6))  # a clock that moves 6 s at every reading
    monkeypatch.setattr(trainer_module, "time",
                        types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    trainer = make_trainer(steps=None, minutes=1.0, **BUDGET)
    rates = _rates(trainer)
    result = trainer.fit()
    # 6 s per step of a 60 s budget: step k runs at progress (k - 1) / 10, the 10th is the last
    assert result.reason == "time" and result.step == 10
    assert rates == pytest.approx([expected(k / 10) for k in range(10)], rel=1e-12)


def test_time_share_and_resume_continue_the_decay() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    schedule = BudgetSchedule(optimizer, TrainConfig(steps=1000, minutes=1.0, **{
        k: v for k, v in BUDGET.items() if k not in ("lr", "eval_every")}))
    schedule.start_session()
    schedule.advance(step=10, elapsed=30.0)  # half the minute, 1 % of the steps: time binds
    assert schedule.progress == pytest.approx(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * expected(0.5))
    schedule.advance(step=900, elapsed=31.0)  # now the steps bind
    assert schedule.progress == pytest.approx(0.9)
    schedule.advance(step=901, elapsed=32.0)
    assert schedule.progress == pytest.approx(0.901)  # never back to the time share
    # a resumed session gets a new minute for the rest of the decay
    state = schedule.state_dict()
    resumed = BudgetSchedule(optimizer, TrainConfig(steps=None, minutes=1.0, schedule="budget"))
    resumed.load_state_dict(state)
    resumed.start_session()
    resumed.advance(step=902, elapsed=30.0)
    assert resumed.progress == pytest.approx(0.901 + 0.099 * 0.5)
    resumed.advance(step=903, elapsed=600.0)
    assert resumed.progress == 1.0 and optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match=r"progress 2\.0"):
        resumed.load_state_dict({"base_lrs": [1.0], "progress": 2.0})


def test_resumed_run_follows_the_uninterrupted_rates(tmp_path: Path) -> None:
    straight = make_trainer(steps=10, **BUDGET)
    want = _rates(straight)
    straight.fit()
    first = make_trainer(tmp_path, steps=10, **BUDGET)
    got = _rates(first, stop_at=6)
    first.fit()
    assert load_checkpoint(tmp_path).meta["scheduler"]["progress"] == pytest.approx(0.6)
    resumed = make_trainer(tmp_path, steps=10, **BUDGET)
    resumed.load(load_checkpoint(tmp_path))
    rest = _rates(resumed)
    resumed.fit()
    assert len(want) == 10 and got + rest == pytest.approx(want, rel=1e-12)


def test_rescaled_rate_keeps_the_decay() -> None:
    trainer = make_trainer(steps=10, **BUDGET)
    trainer.fit()
    trainer.rescale_lr(0.5)  # a resume with half the --lr
    trainer.scheduler.advance(10, 0.0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_budget_needs_a_budget() -> None:
    with pytest.raises(OptionError, match=r"train\.schedule.*train\.steps or train\.minutes"):
        TrainConfig(steps=None, early_stop=3, schedule="budget")


def test_minutes_keyed_budget_refuses_several_processes() -> None:
    from rnnkit.train import Trainer
    from rnnkit.train.distributed import Group

    single = make_trainer(steps=None, minutes=1.0, **BUDGET)
    # each rank's clock differs: rates keyed to it would drift apart between the replicas
    with pytest.raises(ValueError, match=r"'budget' with train\.minutes runs in one process"):
        Trainer(single.model, single.task, single.config, group=Group(rank=0, world_size=2))
