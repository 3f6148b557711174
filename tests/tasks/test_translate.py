"""The translate task: generated dates and TSV pairs, tiny models, checkpoints and heat maps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import shared_file
from rnnkit.tasks import translate
from rnnkit.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _config(**data: object) -> dict:
    config = translate.default_config()
    config["data"].update(train_size=64, valid_size=8, **data)
    config["model"].update(embedding=8)
    config["model"]["encoder"].update(hidden=8)
    config["model"]["decoder"].update(hidden=8)
    config["train"].update(steps=3, batch_size=16, eval_every=3)
    return config


def test_dates_are_read_character_by_character() -> None:
    task, model, source = translate.build(_config())
    assert task.data.char_level and "generated dates" in source
    assert task.counts["train"] == 64 and task.counts["valid"] == 8
    # the target alphabet is digits, the dash, and the four specials
    assert set(task.target_vocab.tokens[4:]) <= set("0123456789-")
    assert model.config.target_vocab == len(task.target_vocab)
    assert model.config.eos == task.target_vocab.eos


def test_batches_keep_targets_longer_than_sources() -> None:
    task, _, _ = translate.build(_config())
    # "20261124" (8 characters) → "2026-11-24</s>" (11): the Trainer's cut must keep the target
    batch = translate.collate([[5] * 8, [6] * 3], [[7] * 11, [8] * 11], pad=0)
    cut = batch.time_slice(0, batch.length)
    assert cut.targets[0].shape == (11, 2) and torch.equal(cut.inputs[1], torch.tensor([[8, 3]]))
    assert bool((cut.inputs[0][8:] == 0).all())
    first, again = task.batch(2), task.batch(2)
    assert torch.equal(first.inputs[0], again.inputs[0])
    assert torch.equal(first.targets[0], again.targets[0])


def test_training_checkpoint_translation_and_heatmap(tmp_path: Path) -> None:
    config = _config()
    task, model, _ = translate.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    result = trainer.fit()
    trainer.out_dir = tmp_path  # a checkpoint without the end-of-run plot: keeps the test fast
    trainer.save()
    assert set(result.valid) == {"loss", "exact", "bleu"} and math.isfinite(result.valid["loss"])
    translator, _ = translate.load_model(tmp_path)
    for a, b in zip(translator.model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    greedy = translator.translate("24 November 2026")
    assert set(greedy) <= set("0123456789-") | {"<unk>"}
    assert isinstance(translator.translate("24.11.2026", beam_width=3), str)
    png = translate.attention_heatmap(translator, "24 Nov 2026", tmp_path / "attention.png")
    assert png is not None and png.stat().st_size > 1000


def test_scores_exact_match_and_bleu() -> None:
    task, _, _ = translate.build(_config())
    references = [ref for _, ref in task.valid]
    exact, bleu = task.scores(references)
    assert exact == 1.0 and bleu.score == pytest.approx(100.0)
    wrong = [list("1999-01-01") for _ in references]
    exact, bleu = task.scores(wrong)
    assert exact == 0.0 and bleu.score < 50


def test_tsv_pairs_at_word_level(tmp_path: Path) -> None:
    rows = ["ein hund\ta dog", "eine katze\ta cat", "ein großer hund\ta big dog"] * 6
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    config = _config(source="tsv", train=str(tmp_path / "train.tsv"), valid=str(tmp_path / "train.tsv"))
    task, model, _ = translate.build(config)
    assert not task.data.char_level and "dog" in task.target_vocab
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    metrics = task.evaluate(model)
    assert 0.0 <= metrics["bleu"] <= 100.0 and 0.0 <= metrics["exact"] <= 1.0
    with pytest.raises(ValueError, match="tsv source needs train and valid files"):
        translate.TranslateDataConfig(source="tsv")


def test_learns_a_copy_task(tmp_path: Path) -> None:
    rows = [f"{a} {b}\t{a} {b}" for a in "abcdef" for b in "ghijkl"]
    (tmp_path / "copy.tsv").write_text("\n".join(rows) + "\n")
    config = _config(source="tsv", train=str(tmp_path / "copy.tsv"), valid=str(tmp_path / "copy.tsv"))
    config["model"]["encoder"].update(hidden=32)
    config["model"]["decoder"].update(hidden=32)
    config["model"].update(embedding=16, dropout=0.0)
    config["train"].update(steps=100, eval_every=100, lr=1e-2)
    task, model, _ = translate.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    assert task.evaluate(model)["exact"] >= 0.9


def test_reads_shared_multi30k() -> None:
    shared_file("multi30k/val.de")
    _, valid, _ = translate.read_pairs(translate.TranslateDataConfig(source="multi30k"))
    assert len(valid) == 1014 and all(s == s.lower() for pair in valid[:20] for s in pair[0])
