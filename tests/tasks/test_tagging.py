"""The tagging task on tiny generated ATIS folders and CoNLL files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import shared_file
from rnnkit.data.conll import convert
from rnnkit.metrics.entities import get_entities
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


# --- CoNLL-2003 style data: IOB1 tags, cased words, singletons -----------------------------

PEOPLE = [["John", "Smith"], ["Mary"], ["Anna", "Lee"]]
PLACES = [["Paris"], ["New", "York"], ["Berlin"]]


def _conll_sentences(count: int, seed: int) -> list[list[tuple[str, str]]]:
    """IOB1 as in CoNLL-2003: entities start with I-; B- where two LOCs touch."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        person = PEOPLE[int(torch.randint(3, (1,), generator=rng))]
        place = PLACES[int(torch.randint(3, (1,), generator=rng))]
        other = PLACES[int(torch.randint(3, (1,), generator=rng))]
        year = str(1990 + int(torch.randint(10, (1,), generator=rng)))
        rows = [(w, "I-PER") for w in person] + [("visited", "O")]
        rows += [(w, "I-LOC") for w in place] + [(w, "B-LOC" if i == 0 else "I-LOC")
                                                 for i, w in enumerate(other)]
        out.append([*rows, ("in", "O"), (year, "O"), (".", "O")])
    return out


def _write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""]
    for rows in sentences:
        lines += [f"{word} NNP I-NP {tag}" for word, tag in rows] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def conll(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("conll")
    train = [*_conll_sentences(40, 0), [("Zed", "I-PER"), ("slept", "O")]]  # singletons
    return (_write_conll(root / "eng.train", train),
            _write_conll(root / "eng.testa", _conll_sentences(10, 1)))


def _conll_config(files: tuple[Path, Path], **data: object) -> dict:
    config = tagging.default_config()
    config["data"].update(train=str(files[0]), valid=str(files[1]), lowercase=True,
                          zero_digits=True, tag_scheme="iobes", **data)
    config["model"].update(embedding=8, chars=True, char_embedding=4, char_hidden=4)
    config["model"]["recurrent"].update(hidden=8)
    config["train"].update(steps=4, batch_size=8, eval_every=4)
    return config


def test_conll_is_detected_and_trained_in_iobes(conll: tuple[Path, Path]) -> None:
    task, model, source = tagging.build(_conll_config(conll))  # format "auto"
    assert "skipped 1 -DOCSTART- lines" in source and model.config.intents == 0
    vocab = task.vocab
    assert vocab.scheme == "iob1" and {"S-LOC", "B-LOC", "E-LOC", "B-PER", "E-PER"} <= set(
        vocab.tags.tokens) and "I-LOC" not in vocab.tags  # no LOC of 3+ tokens
    train = task.splits["train"]
    # gold tags as read (IOB1); the model's targets in IOBES
    assert train.gold_tags[0][0] == "I-PER" and "B-LOC" in train.gold_tags[0]
    assert [vocab.tags.tokens[t] for t in train.tags[0]] == convert(train.gold_tags[0], "iobes")
    # the word embedding reads lower case and digits as 0; the characters keep the case
    words = vocab.words
    assert "paris" in words and "Paris" not in words and "0000" in words and "1990" not in words
    assert "Paris" in vocab and "PARIS" in vocab and "London" not in vocab
    chars = vocab.chars
    assert chars is not None and "P" in chars and "p" in chars


def test_conll_predictions_are_scored_in_iob1_as_seqeval_does(conll: tuple[Path, Path]) -> None:
    seqeval_metrics = pytest.importorskip("seqeval.metrics")
    config = _conll_config(conll)
    config["train"].update(steps=30, eval_every=30, lr=1e-2)
    task, model, _ = tagging.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    predicted, intents, _ = task.predict(model, "valid")
    assert intents is None
    gold = task.splits["valid"].gold_tags
    # written back in the data's scheme: IOB1, no E-/S-
    assert all(convert(tags, "iob1") == tags for tags in predicted)
    assert not any(t[:2] in ("E-", "S-") for tags in predicted for t in tags)
    scores = task.scores(model, "valid")
    assert scores.entities.f1 == pytest.approx(seqeval_metrics.f1_score(gold, predicted), abs=1e-12)
    assert scores.entities.actual == sum(len(get_entities(tags)) for tags in gold)


@pytest.mark.parametrize("trained_in", ["as_read", "iobes"])
def test_data_in_another_scheme_scores_as_in_the_training_one(conll: tuple[Path, Path],
                                                                trained_in: str) -> None:
    # the dev file in IOB2 (or IOBES) for a model trained on IOB1 holds the same entities: the
    # loss and sentence accuracy were computed against tags the model never writes (IOB1
    # predictions against IOB2 gold), so every sentence with an entity counted wrong
    config = _conll_config(conll)
    config["data"]["tag_scheme"] = trained_in
    config["train"].update(steps=80, eval_every=80, lr=3e-2)
    task, model, _ = tagging.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    assert task.vocab.data_scheme == "iob1"
    as_read = task.scores(model, "valid").metrics()
    assert as_read["sentence_acc"] > 0.5  # else equal accuracies below would say little
    valid = task.splits["valid"]
    for scheme in ("iob2", "iobes"):
        rewritten = [(tokens, convert(tags, scheme), None)
                     for tokens, tags in zip(valid.tokens, valid.gold_tags)]
        encoded = tagging.encode(rewritten, task.vocab)
        assert encoded.scheme == scheme
        predicted, _, _ = tagging.predict_split(model, encoded, task.vocab, 256)
        assert all(convert(tags, scheme) == tags for tags in predicted)
        assert tagging.score_split(model, encoded, task.vocab, 256).metrics() == pytest.approx(
            as_read, abs=1e-6)


def test_singletons_read_as_unk_in_training_batches(conll: tuple[Path, Path]) -> None:
    never, _, _ = tagging.build(_conll_config(conll))
    always, _, _ = tagging.build(_conll_config(conll, singleton_unk=1.0))
    half, _, _ = tagging.build(_conll_config(conll, singleton_unk=0.5))
    vocab = always.vocab
    singletons = {vocab.words.index["zed"], vocab.words.index["slept"]}
    assert set(always.singletons.tolist()) == singletons and never.singletons is None
    unk = vocab.words.unk
    for index in range(len(always.plan)):
        plain, dropped = never.batch(index).inputs[0], always.batch(index).inputs[0]
        is_single = torch.isin(plain, torch.tensor(sorted(singletons)))
        assert torch.equal(dropped, torch.where(is_single, unk, plain))
        assert torch.equal(half.batch(index).inputs[0], half.batch(index).inputs[0])  # pure
    # validation data is never dropped
    assert torch.equal(tagging.collate(always.splits["valid"], [0]).inputs[0],
                       tagging.collate(never.splits["valid"], [0]).inputs[0])


def test_conll_run_loads_predicts_and_evaluates_by_type(conll: tuple[Path, Path], tmp_path: Path
                                                         ) -> None:
    import rnnkit

    config = _conll_config(conll)
    task, model, _ = tagging.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    trainer.fit()
    trainer.out_dir = tmp_path
    trainer.save()
    pipe = rnnkit.load(tmp_path)
    tagged = pipe.predict(["John Smith visited Paris in 1997 ."])[0]
    assert tagged.intent is None and len(tagged.tags) == len(tagged.tokens) == 7
    assert tagged.tokens[0] == "John"  # as typed: the case is the characters' to read
    assert [(e.type, e.start, e.end) for e in tagged.entities] == get_entities(tagged.tags)
    assert tagged.unknown == []  # "1997" reads as "0000", known
    metrics = pipe.evaluate(conll[1])
    assert metrics == pytest.approx(tagging.score_split(
        model, task.splits["valid"], task.vocab, 256).metrics() | {
        "examples": 10.0, **{k: v for k, v in metrics.items() if "/" in k}})
    assert {"slot_f1/PER", "slot_f1/LOC", "support/PER", "support/LOC"} <= set(metrics)
    assert metrics["support/LOC"] == 20  # two places in each of the 10 sentences
    line = pipe.describe_metrics(metrics)
    assert "F1 by type: LOC" in line and "PER" in line


def test_a_cased_run_reads_typed_words_as_evaluation_does(conll: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    import rnnkit

    # a cased vocabulary (no lowercase option): "Visited" was read as the known "visited" by
    # predict, but as written (<unk>, its capital for the characters) by evaluate
    config = _conll_config(conll)
    config["data"]["lowercase"] = False
    task, model, _ = tagging.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    trainer.out_dir = tmp_path
    trainer.save()
    assert "visited" in task.vocab.words and "Visited" not in task.vocab.words
    typed = ["John", "Smith", "Visited", "Paris", "In", "1997", "."]
    tagged = rnnkit.load(tmp_path).predict(" ".join(typed))
    assert tagged.tokens == typed and "Visited" in tagged.unknown
    evaluated, _, _ = tagging.predict_split(
        model, tagging.encode([(typed, ["O"] * len(typed), None)], task.vocab), task.vocab, 8)
    assert tagged.tags == evaluated[0]


def _evaluate_error(conll: tuple[Path, Path], tmp_path: Path,
                    capsys: pytest.CaptureFixture[str], data: Path) -> str:
    """What `rnnkit evaluate` of an untrained CoNLL run prints on stderr for ``data`` (exit 2)."""
    from rnnkit.cli import main

    config = _conll_config(conll)
    task, model, _ = tagging.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    trainer.out_dir = tmp_path / "run"
    trainer.save()
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(data)]) == 2
    return capsys.readouterr().err


def test_a_file_of_neither_format_is_one_line(conll: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    prose = tmp_path / "prose.txt"
    prose.write_text("Just a sentence here.\nAnd another one.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prose\.txt is neither tagging format"):
        tagging.build(_conll_config((prose, conll[1])))
    err = _evaluate_error(conll, tmp_path, capsys, prose)
    assert err.count("\n") == 1 and "neither tagging format" in err and "Traceback" not in err


def test_a_value_that_is_no_tag_is_one_line(conll: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # the first line decides the format; "NNP" further down was scored as an entity type "_"
    columns = tmp_path / "columns.txt"
    columns.write_text("EU B-ORG\nrejects O\n\nPeter NNP\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"columns\.txt: sentence 2, token 1: 'NNP' in column -1"):
        tagging.build(_conll_config((columns, conll[1])))
    err = _evaluate_error(conll, tmp_path, capsys, columns)
    assert err.count("\n") == 1 and "'NNP' in column -1" in err and "Traceback" not in err


def test_conll_file_without_valid_is_one_clear_error(conll: tuple[Path, Path]) -> None:
    config = _conll_config(conll)
    config["data"]["valid"] = None
    with pytest.raises(ValueError, match=r"eng\.train is a CoNLL file: give the validation file"):
        tagging.build(config)


def test_reads_shared_conll2003() -> None:
    train = shared_file("conll2003/eng.train")
    data = tagging.TaggingDataConfig(train=str(train), valid=str(train.with_suffix(".testa")))
    assert data.resolved_format() == "conll"
    examples, summary = tagging.read_split(data, "valid")  # type: ignore[misc]
    assert len(examples) == 3250 and "216 -DOCSTART- lines" in summary


def test_conll2003_example_config_holds_valid_options() -> None:
    import yaml

    from rnnkit.tasks import merge_config

    path = Path(__file__).resolve().parents[2] / "examples" / "tagging-conll2003.yaml"
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = merge_config(tagging.default_config(), settings, str(path), "tagging")
    data = tagging.TaggingDataConfig(**config["data"])
    assert (data.format, data.tag_scheme, data.singleton_unk) == ("conll", "iobes", 0.5)
    assert config["model"]["crf"] and config["model"]["chars"] and config["model"]["dropout"] == 0.5
    assert config["train"]["minutes"] <= 30 and config["train"]["clip_norm"] == 5.0
