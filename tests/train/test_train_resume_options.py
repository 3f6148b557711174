"""A run resumed with another learning rate: the rate is applied, schedules keep their cuts."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import make_trainer

from rnnkit.train.checkpoint import load_checkpoint


@pytest.mark.parametrize("schedule", ["none", "plateau", "step"])
def test_rescale_lr_scales_the_rate_and_the_schedule(schedule: str, tmp_path: Path) -> None:
    first = make_trainer(tmp_path, steps=8, eval_every=2, lr=0.01, schedule=schedule,
                         decay_after=1, plateau_patience=0)
    first.fit()
    rate_then = first.optimizer.param_groups[0]["lr"]  # after the schedule's cuts so far

    again = make_trainer(tmp_path, steps=12, eval_every=2, lr=0.01, schedule=schedule,
                         decay_after=1, plateau_patience=0)
    again.load(load_checkpoint(tmp_path))
    again.rescale_lr(0.1)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(rate_then * 0.1)
    if schedule == "step":  # the next decay multiplies the new base rate
        base = again.scheduler.base_lrs[0]
        assert base == pytest.approx(0.001)
        again.scheduler.step()
        evaluations = again.scheduler.last_epoch
        assert again.optimizer.param_groups[0]["lr"] == pytest.approx(
            base * 0.5 ** max(0, evaluations + 1 - 1))
    again.fit()
    saved = load_checkpoint(tmp_path)
    assert saved.meta["step"] == 12
    assert saved.meta["optimizer"]["param_groups"][0]["lr"] <= rate_then * 0.1 + 1e-12
