"""The tagging task on tiny generated ATIS folders and CoNLL files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import shared_file
from rnnkit.tasks import tagging
from rnnkit.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


CITIES = ["boston", "denver", "new york", "san francisco"]


def _utterances(count: int, seed: int) -> list[tuple[list[str], list[str], str]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        a, b = torch.randint(len(CITIES), (2,), generator=generator).tolist()
        fare = bool(torch.randint(2, (1,), generator=generator))
        tokens = ["show", "fares" if fare else "flights", "from"]
        tags = ["O", "O", "O"]
        for city, role in ((CITIES[a], "fromloc"), (CITIES[b], "toloc")):
            words = city.split()
            tokens += words + (["to"] if role == "fromloc" else [])
            tags += [f"B-{role}.city_name"] + [f"I-{role}.city_name"] * (len(words) - 1)
            tags += ["O"] if role == "fromloc" else []
        out.append((tokens, tags, "atis_airfare" if fare else "atis_flight"))
    return out


@pytest.fixture(scope="module")
def atis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("atis")
    for split, count, seed in (("train", 60, 0), ("dev", 12, 1), ("test", 12, 2)):
        folder = root / split
        folder.mkdir()
        rows = _utterances(count, seed)
        if split == "test":  # an intent and a tag never seen in training
            rows.append((["list", "airlines"], ["O", "B-airline_name"], "atis_airline"))
        (folder / "seq.in").write_text("".join(" ".join(t) + "\n" for t, _, _ in rows))
        (folder / "seq.out").write_text("".join(" ".join(g) + "\n" for _, g, _ in rows))
        (folder / "label").write_text("".join(i + "\n" for _, _, i in rows))
    return root


def _config(atis: Path, **model: object) -> dict:
    config = tagging.default_config()
    config["data"].update(train=str(atis / "train"), valid=str(atis / "dev"),
                          test=str(atis / "test"))
    config["model"].update(embedding=8, char_hidden=4, char_embedding=4, **model)
    config["model"]["recurrent"].update(hidden=8)
    config["train"].update(steps=4, batch_size=16, eval_every=2)
    return config


def test_build_derives_vocabularies(atis: Path) -> None:
    task, model, source = tagging.build(_config(atis, chars=True))
    assert task.counts == {"train": 60, "valid": 12, "test": 13}
    assert model.config.intents == 3  # <unk> + two intents
    assert task.vocab.tags.tokens[0] == "<unk>" and "B-toloc.city_name" in task.vocab.tags
    assert model.config.chars == len(task.vocab.chars) and model.config.crf
    assert "60 examples" in source
    # unseen test intent / tag map to <unk> but keep their strings for scoring
    test = task.splits["test"]
    assert test.intents[-1] == 0 and test.tags[-1] == [task.vocab.tags.index["O"], 0]
    assert test.gold_tags[-1] == ["O", "B-airline_name"]


def test_batches_are_pure_and_shaped(atis: Path) -> None:
    task, _, _ = tagging.build(_config(atis, chars=True))
    batch = task.batch(2)
    tokens, lengths, chars, char_lengths = batch.inputs
    tags, intents = batch.targets
    assert lengths.shape == intents.shape == (1, 16)
    assert tags.shape == tokens.shape and chars.shape[:2] == tokens.shape
    assert int(lengths.max()) == tokens.shape[0]
    # character lengths are the word lengths on real words, 0 on padding
    assert bool(((char_lengths > 0) == (tokens != 0)).all())
    again = task.batch(2)
    assert torch.equal(again.inputs[0], tokens) and torch.equal(again.targets[0], tags)


@pytest.mark.parametrize(("crf", "chars"), [(True, False), (False, True)])
def test_training_checkpoint_and_tag_sentence(atis: Path, tmp_path: Path, crf: bool, chars: bool
                                              ) -> None:
    config = _config(atis, crf=crf, chars=chars)
    task, model, _ = tagging.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    result = trainer.fit()
    trainer.out_dir = tmp_path  # a checkpoint without the end-of-run plot: keeps the test fast
    trainer.save()
    assert {"loss", "slot_f1", "intent_acc", "sentence_acc"} <= set(result.valid)
    assert math.isfinite(result.valid["loss"])
    loaded, vocab, _ = tagging.load_model(tmp_path)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    tags, intent = tagging.tag_sentence(loaded, vocab, ["show", "flights", "from", "boston", "to", "paris"])
    assert len(tags) == 6 and intent in ("atis_flight", "atis_airfare", "<unk>")
    scores = task.scores(loaded, "test")
    assert scores.entities.actual == 12 * 2 + 1  # every reference entity counts, unseen type too


def test_learns_slots_and_intents(atis: Path) -> None:
    config = _config(atis)
    config["train"].update(steps=80, eval_every=80, lr=1e-2)
    task, model, _ = tagging.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    scores = task.scores(model, "valid")
    assert scores.entities.f1 > 0.9 and scores.intent_accuracy == 1.0


def test_conll_files(tmp_path: Path) -> None:
    text = "-DOCSTART- -X- O\n\nJohn NNP B-PER\nlives VBZ O\nin IN O\nParis NNP S-LOC\n\n" \
           "Mary NNP B-PER\nSmith NNP E-PER\n\n"
    (tmp_path / "train.txt").write_text(text)
    config = tagging.default_config()
    config["data"].update(format="conll", train=str(tmp_path / "train.txt"),
                          valid=str(tmp_path / "train.txt"))
    config["model"].update(embedding=8, chars=True)
    config["model"]["recurrent"].update(hidden=8)
    config["train"].update(steps=2, batch_size=2, eval_every=2)
    task, model, source = tagging.build(config)
    assert task.counts == {"train": 2, "valid": 2} and model.config.intents == 0
    assert "skipped 1 -DOCSTART- lines" in source
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    metrics = task.evaluate(model)
    assert "intent_acc" not in metrics and math.isfinite(metrics["slot_f1"])
    with pytest.raises(ValueError, match="conll format needs train and valid files"):
        tagging.TaggingDataConfig(format="conll")


def test_reads_shared_atis() -> None:
    shared_file("atis/test/seq.out")
    read = tagging.read_split(tagging.TaggingDataConfig(), "test")
    assert read is not None and len(read[0]) == 893
