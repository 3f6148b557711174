"""NaN/inf losses stop training naming the step; early stopping; the plateau schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import make_trainer

from rnnkit.train import DivergenceError, load_checkpoint


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=10, checkpoint_every=2, eval_every=2)
    original = trainer.task.step

    def poisoned(model: Any, batch: Any, state: Any) -> Any:
        result = original(model, batch, state)
        if trainer.step == 4:  # the 5th step
            result.loss = result.loss * float("nan")
        return result

    trainer.task.step = poisoned  # type: ignore[method-assign]
    with pytest.raises(DivergenceError, match="step 5: the training loss is nan"):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.meta["step"] == 4
    assert (tmp_path / "curves.png").is_file()  # the run up to the blow-up, for diagnosis


def test_early_stopping_on_the_validation_loss() -> None:
    trainer = make_trainer(steps=100, eval_every=1, early_stop=2, schedule="none")
    losses = iter([3.0, 2.0, 2.5, 2.4, 1.0])
    trainer.task.evaluate = lambda model: {"loss": next(losses)}  # type: ignore[method-assign]
    result = trainer.fit()
    assert (result.reason, result.step, result.best_valid) == ("early_stop", 4, 2.0)


def test_monitoring_a_metric_where_higher_is_better(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=10, eval_every=1, early_stop=2, monitor="accuracy",
                           monitor_mode="max")
    scores = iter([(0.9, 0.5), (0.8, 0.7), (1.2, 0.6), (1.3, 0.65), (0.1, 0.1)])
    trainer.task.evaluate = lambda model: dict(zip(("loss", "accuracy"), next(scores)))  # type: ignore[method-assign]
    result = trainer.fit()
    # the loss fell at step 5 (too late); accuracy peaked at step 2 and then twice did not improve
    assert (result.reason, result.step, result.best_valid) == ("early_stop", 4, 0.7)
    assert load_checkpoint(tmp_path / "best.json").meta["step"] == 2
    with pytest.raises(ValueError, match=r"train\.monitor is 'bleu', but the charlm task's validation "
                                         "reports only accuracy, loss"):
        trainer.config.monitor = "bleu"
        trainer.task.evaluate = lambda model: {"loss": 1.0, "accuracy": 0.5}  # type: ignore[method-assign]
        trainer._evaluate_and_schedule(None, None)
    with pytest.raises(ValueError, match="monitor_mode must be one of min, max"):
        make_trainer(monitor_mode="up")


def test_plateau_schedule_lowers_the_learning_rate() -> None:
    trainer = make_trainer(steps=4, eval_every=1, lr=0.01, plateau_factor=0.5, plateau_patience=1)
    trainer.task.evaluate = lambda model: {"loss": 1.0}  # type: ignore[method-assign]
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] < 0.01


def test_step_schedule_keeps_the_rate_then_decays_at_every_evaluation(tmp_path: Path) -> None:
    rates: list[float] = []
    trainer = make_trainer(tmp_path, steps=6, eval_every=1, lr=1.0, schedule="step",
                           decay_factor=0.5, decay_after=2)
    trainer.on_step = lambda t, record: rates.append(t.optimizer.param_groups[0]["lr"])
    trainer.fit()
    assert rates == [1.0, 1.0, 0.5, 0.25, 0.125, 0.0625]  # Zaremba et al.: full rate, then halving
    resumed = make_trainer(tmp_path, steps=7, eval_every=1, lr=1.0, schedule="step",
                           decay_factor=0.5, decay_after=2)
    resumed.load(load_checkpoint(tmp_path))
    assert resumed.optimizer.param_groups[0]["lr"] == 0.03125


def test_metrics_log_and_plot(tmp_path: Path) -> None:
    import json

    result = make_trainer(tmp_path, steps=4, eval_every=2).fit()
    records = [json.loads(line) for line in result.metrics.open()]
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in valid] == [2, 4]
    assert set(train[0]["grad_norms"]) == {"embedding", "rnn.l0", "rnn.l1", "decoder"}
    assert {"loss", "bpc"} <= set(valid[0])
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
