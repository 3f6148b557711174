"""The pipelines on the real shared data sets: a two-step run of each, then ``evaluate`` on the
file its validation read gives the validation numbers (slow: the corpora are read in full)."""

from __future__ import annotations

from pathlib import Path

import pytest

import rnnkit
from conftest import shared_file
from rnnkit.cli import main
from rnnkit.train.checkpoint import load_checkpoint

CASES = {
    # task: (training flags, the validation data in the task's own format, evaluate options)
    "tagging": (["--set", "data.format=conll", "--set", "data.train={d}/conll2003/eng.train",
                 "--set", "data.valid={d}/conll2003/eng.testa"], "conll2003/eng.testa", {}),
    "sentiment": (["--set", "data.holdout=0", "--set", "data.max_train_examples=5000"],
                  "sst2/dev.tsv", {}),
    "translate": (["--set", "data.source=multi30k", "--set", "data.max_length=12",
                   "--set", "model.encoder.hidden=16", "--set", "model.decoder.hidden=16"],
                  "multi30k/val", {}),
    "music": ([], "polyphonic/JSB_Chorales.mat", {"split": "valid"}),
    "wordlm": (["--set", "data.max_train_words=20000"], "ptb/ptb.valid.txt", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(CASES))
def test_evaluate_on_shared_data_repeats_validation(task: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    flags, valid, options = CASES[task]
    # the shared data folder, found through a file the case needs (skips when it is absent)
    data = shared_file(valid if task != "translate" else "multi30k/val.en").parents[1]
    out = tmp_path / "run"
    args = [f.format(d=data) for f in flags]
    if task != "translate":
        args += ["--hidden", "16"]
    assert main(["train", task, *args, "--steps", "2", "--eval-every", "2",
                 "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    validated = load_checkpoint(out / "best.json").meta["valid"]
    metrics = rnnkit.load(out).evaluate(data / valid, **options)
    for key, value in validated.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
