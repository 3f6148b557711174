"""Budgets, progress and the final lines of ``rnnkit train`` (issue 17, item 5): a --minutes the
user gives is the budget, the bar's total follows the binding budget, the run says in words why
it stopped and prints the scores of the weights it keeps (best.json), naming their step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from rnnkit.cli import main
from rnnkit.options import OptionError
from rnnkit.train.config import TrainConfig
from rnnkit.train.trainer import budget_total, stop_words

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the cat sat on the mat; the dog sat on the log.\n" * 40


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT, encoding="utf-8")
    return ["train", "charlm", "--data", str(data), "--out", str(tmp_path / out),
            "--layers", "1", "--hidden", "8", "--embedding", "4", "--batch-size", "2",
            "--seq-len", "8", "--count", "0", "--no-progress", *extra]


def test_budget_total_is_the_step_the_first_budget_reaches() -> None:
    steps_only = TrainConfig(steps=800)
    assert budget_total(steps_only, 10, 10, 5.0) == 800
    timed = TrainConfig(steps=800, minutes=1.0)
    assert budget_total(timed, 0, 0, 0.0) == 800  # no pace yet: the cap
    # 10 steps in 5 s: 55 s left reach 110 more steps, well before the cap
    assert budget_total(timed, 10, 10, 5.0) == 120
    assert budget_total(TrainConfig(steps=50, minutes=1.0), 10, 10, 5.0) == 50  # the cap binds
    uncapped = TrainConfig(steps=None, minutes=1.0)
    assert budget_total(uncapped, 0, 0, 0.0) is None
    # resumed at step 100: the pace is this session's, the total counts from where it is
    assert budget_total(uncapped, 110, 10, 5.0) == 220


def test_no_cap_needs_another_limit() -> None:
    with pytest.raises(OptionError, match=r"train\.minutes or train\.early_stop"):
        TrainConfig(steps=None)
    assert TrainConfig(steps=None, early_stop=3).steps is None


@pytest.mark.parametrize(("reason", "words"), [
    ("steps", "the step budget (train.steps = 800) is reached"),
    ("time", "the time budget (train.minutes = 1.5) ran out"),
    ("early_stop", "early stopping: no validation gain in loss for 2 evaluations"),
    ("interrupted", "interrupted (Ctrl-C or SIGTERM)"),
])
def test_stop_words(reason: str, words: str) -> None:
    config = TrainConfig(steps=800, minutes=1.5, early_stop=2)
    assert words in stop_words(reason, config)


def test_minutes_lifts_the_default_step_cap(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path, "timed", "--minutes", "0.02", "--eval-every", "1000000")) == 0
    printed = capsys.readouterr().out
    assert "budget: 0.02 minutes (--steps, --minutes)" in printed
    assert "the time budget (train.minutes = 0.02) ran out" in printed
    saved = yaml.safe_load((tmp_path / "timed" / "config.yaml").read_text())
    assert saved["train"]["steps"] is None and saved["train"]["minutes"] == 0.02


def test_minutes_and_steps_whichever_first(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path, "capped", "--minutes", "5", "--steps", "3")) == 0
    printed = capsys.readouterr().out
    assert "budget: 3 steps or 5 minutes, whichever comes first" in printed
    assert "stopped at step 3: the step budget (train.steps = 3) is reached" in printed


def test_final_line_shows_the_kept_weights_not_the_last(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    # weights chosen by the highest loss: the first evaluation's, so the kept weights are
    # not the last ones whatever the run's pace
    assert main(_args(tmp_path, "run", "--steps", "15", "--eval-every", "5", "--monitor", "bpc",
                      "--monitor-mode", "max")) == 0
    printed = capsys.readouterr().out
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "valid"][-1]
    assert best["step"] != last["step"], "the test needs a run whose best is not its last"
    kept = re.search(r"kept weights: step (\d+) \(best validation bpc\), validation "
                     r"([\d.]+) nats/char", printed)
    assert kept, printed
    assert int(kept.group(1)) == best["step"]
    assert float(kept.group(2)) == pytest.approx(best["valid"]["loss"], abs=1e-4)
    assert abs(float(kept.group(2)) - last["loss"]) > 1e-3


def test_curves_say_the_unit_the_command_line_prints(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import rnnkit.viz.curves as curves

    units: list[str] = []
    original = curves.plot_run

    def spy(*args: object, unit: str = "", **kwargs: object) -> Path:
        units.append(unit)
        return original(*args, unit=unit, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(curves, "plot_run", spy)
    assert main(_args(tmp_path, "unit", "--steps", "2", "--eval-every", "2")) == 0
    assert units == ["nats/char"] and "nats/char" in capsys.readouterr().out
