"""The sentiment task on a tiny generated TSV pair (and SST-2 when the shared data is present)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import shared_file
from rnnkit.data.text import FormatError
from rnnkit.tasks import sentiment
from rnnkit.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


GOOD, BAD = ["great", "fine", "lovely", "superb"], ["awful", "dull", "bad", "boring"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("sst")
    generator = torch.Generator().manual_seed(0)

    def rows(count: int) -> list[str]:
        out = []
        for i in range(count):
            label = i % 2
            words = GOOD if label else BAD
            length = 1 + int(torch.randint(6, (1,), generator=generator))
            picks = torch.randint(4, (length,), generator=generator).tolist()
            out.append(f"{label}\tthe film was " + " ".join(words[p] for p in picks))
        return out

    train, dev = directory / "train.tsv", directory / "dev.tsv"
    train.write_text("\n".join(["label\tsentence", *rows(80)]) + "\n")
    dev.write_text("\n".join(["label\tcontent", *rows(20)]) + "\n")  # SST-2's dev header
    return train, dev


def _config(files: tuple[Path, Path], **train: object) -> dict:
    config = sentiment.default_config()
    config["data"].update(train=str(files[0]), valid=str(files[1]), holdout=0)
    config["model"].update(embedding=8, chars=True)
    config["model"]["recurrent"].update(hidden=8)
    config["train"].update({"steps": 4, "batch_size": 16, "eval_every": 2, **train})
    return config


def test_build_reads_both_headers_and_derives_sizes(files: tuple[Path, Path]) -> None:
    task, model, source = sentiment.build(_config(files))
    assert task.counts["train"] == 80 and task.counts["valid"] == 20
    assert task.labels == ["0", "1"]
    assert model.config.vocab_size == len(task.vocab) and model.config.classes == 2
    assert "80 examples" in source and "skipped 1 header lines" in source


def test_batches_keep_lengths_and_labels_whole(files: tuple[Path, Path]) -> None:
    task, _, _ = sentiment.build(_config(files))
    batch = task.batch(3)
    tokens, lengths, chars, char_lengths = batch.inputs
    assert lengths.shape == (1, 16) and batch.targets.shape == (1, 16)
    assert chars.shape[:2] == tokens.shape and char_lengths.shape == tokens.shape
    # every real word carries its spelling; padding words have none
    for b, n in enumerate(lengths[0].tolist()):
        assert bool((char_lengths[:n, b] > 0).all()) and bool((char_lengths[n:, b] == 0).all())
        first = task.encoder.chars.decode(chars[0, b, : int(char_lengths[0, b])].tolist())
        assert "".join(first) == task.vocab.decode([int(tokens[0, b])])[0]
    assert int(lengths.max()) == tokens.shape[0]
    # padding sits exactly past each sentence's length
    for b, n in enumerate(lengths[0].tolist()):
        assert bool((tokens[:n, b] != task.vocab.pad).all()) and bool((tokens[n:, b] == 0).all())
    whole = batch.time_slice(0, tokens.shape[0])
    assert torch.equal(whole.inputs[1], lengths) and torch.equal(whole.targets, batch.targets)
    again = task.batch(3)
    assert torch.equal(again.inputs[0], tokens) and torch.equal(again.targets, batch.targets)


def test_word_dropout_is_seeded_by_the_batch_index(files: tuple[Path, Path]) -> None:
    config = _config(files)
    plain_task, _, _ = sentiment.build(config)
    config["data"]["word_dropout"] = 0.5
    task, _, _ = sentiment.build(config)
    plain, first, again = plain_task.batch(2), task.batch(2), task.batch(2)
    assert torch.equal(first.inputs[0], again.inputs[0])
    tokens, lengths, chars, _ = first.inputs
    real = tokens != task.vocab.pad
    assert torch.equal(chars, plain.inputs[2])  # a dropped word keeps its spelling
    dropped = (tokens == task.vocab.unk) & (plain.inputs[0] != task.vocab.unk)
    assert 0 < int(dropped.sum()) < int(real.sum())
    # only words are replaced: lengths, padding and labels stay as they were
    assert torch.equal(lengths, plain.inputs[1]) and torch.equal(first.targets, plain.targets)
    assert torch.equal(real, plain.inputs[0] != task.vocab.pad)


def test_held_out_sentences_take_their_phrases_with_them() -> None:
    def example(text: str, label: str = "1") -> tuple[list[str], str]:
        return text.split(), label

    sentences = ["a b c d e f g", "h i j k l m n", "o p q r s t u", "v w x y z a b"]
    phrases = ["b c d", "c d", "i j k l", "i j", "p q r", "a", "x y z", "w x y z a"]
    examples = [example(t) for t in sentences + phrases]
    rest, held = sentiment.hold_out_sentences(examples, 2, seed=3)
    assert len(held) == 2 and all(" ".join(t) in sentences for t, _ in held)
    left = {" ".join(t) for t, _ in rest}
    for tokens, _ in held:
        text = " ".join(tokens)
        # every phrase of 3+ words inside a held-out sentence left with it; short ones stay
        assert not any(len(p.split()) >= 3 and f" {p} " in f" {text} " for p in left)
    assert {"c d", "i j", "a"} <= left
    assert len(rest) + len(held) < len(examples)
    with pytest.raises(ValueError, match="only 4 whole sentences of 6\\+ words can be held out"):
        sentiment.hold_out_sentences(examples, 5, seed=0)
    assert sentiment.hold_out_sentences(examples, 0, seed=0) == (examples, [])


def test_validation_runs_on_the_holdout_when_there_is_one(files: tuple[Path, Path]) -> None:
    config = _config(files)
    config["data"]["holdout"] = 3
    task, _, source = sentiment.build(config)
    assert task.validation_split == "holdout" and task.counts["holdout"] == 3
    assert "3 training sentences and their phrases held out" in source
    assert len(task.splits["dev"][0]) == 20  # the dev set is untouched


def test_metrics_per_class() -> None:
    scores = sentiment.classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["0", "1"])
    assert scores["accuracy"] == 0.75
    assert scores["f1_negative"] == pytest.approx(2 / 3)  # P 1, R 1/2
    assert scores["f1_positive"] == pytest.approx(0.8)  # P 2/3, R 1
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_three_classes_keep_their_own_names() -> None:
    # "1" was reported as "positive" whatever the label set: in 0/1/2 data it is the middle one
    scores = sentiment.classification_metrics([0, 1, 2], [0, 1, 1], ["0", "1", "2"])
    assert {"f1_0", "f1_1", "f1_2"} <= set(scores) and "f1_positive" not in scores
    assert sentiment.label_names(["0", "1", "2"]) == ["0", "1", "2"]
    assert sentiment.label_names(["0", "1"]) == ["negative", "positive"]


def test_macro_f1_matches_scikit_learn_on_data_lacking_a_class() -> None:
    metrics = pytest.importorskip("sklearn.metrics", reason="the dev extra installs scikit-learn")
    # a file of positive sentences only, every one right: a class in neither references nor
    # predictions was averaged in as F1 0 (macro F1 0.5)
    for references, predictions in (([1, 1, 1], [1, 1, 1]), ([1, 1, 2], [1, 2, 2]),
                                    ([0, 1, 1, 0], [1, 1, 0, 0])):
        ours = sentiment.classification_metrics(references, predictions, ["0", "1", "2"])
        assert ours["macro_f1"] == pytest.approx(
            metrics.f1_score(references, predictions, average="macro"), abs=1e-12)
        assert ours["accuracy"] == metrics.accuracy_score(references, predictions)


def test_unknown_dev_label_and_missing_file_are_named(files: tuple[Path, Path], tmp_path: Path
                                                      ) -> None:
    odd = tmp_path / "dev.tsv"
    odd.write_text("label\tsentence\n7\tgreat\n")
    with pytest.raises(ValueError, match=r"labels \['7'\] do not occur in the training data"):
        sentiment.build(_config((files[0], odd)))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tsv does not exist"):
        sentiment.build(_config((files[0], tmp_path / "nowhere.tsv")))
    bad = tmp_path / "bad.tsv"
    bad.write_text("score\tsentence\n1\tgreat\n")
    with pytest.raises(FormatError, match="lacks a column named label"):
        sentiment.build(_config((bad, files[1])))


def test_training_checkpoint_and_classify(files: tuple[Path, Path], tmp_path: Path) -> None:
    config = _config(files)
    task, model, _ = sentiment.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    result = trainer.fit()
    trainer.out_dir = tmp_path  # a checkpoint without the end-of-run plot: keeps the test fast
    trainer.save()
    assert {"loss", "accuracy", "f1_negative", "f1_positive"} <= set(result.valid)
    assert result.best_valid is not None and 0 <= result.best_valid <= 1  # accuracy is monitored
    assert math.isfinite(result.valid["loss"])
    loaded, encoder, labels, _ = sentiment.load_model(tmp_path)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    label, probability = sentiment.classify(loaded, encoder, labels, "The film was GREAT unseen -LRB- !")
    assert label in labels and 0.5 <= probability <= 1.0


def test_an_ensemble_averages_class_probabilities(files: tuple[Path, Path]) -> None:
    config = _config(files)
    task, first, _ = sentiment.build(config)
    torch.manual_seed(1)
    _, second, _ = sentiment.build(config)
    refs, single, loss = task.predictions(first)
    assert task.predictions([first, first]) == (refs, single, pytest.approx(loss, abs=1e-5))
    mean = (task.probabilities(first) + task.probabilities(second)) / 2  # (N, C)
    assert task.predictions([first, second])[1] == mean.argmax(-1).tolist()
    assert torch.allclose(task.probabilities(first).sum(-1), torch.ones(20))


def test_report_scores_the_chosen_weights_on_dev(files: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(files, steps=6, eval_every=2)
    config["data"]["holdout"] = 3
    task, model, _ = sentiment.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), tmp_path, progress=False).fit()
    sentiment.report(task, model, config, tmp_path)
    printed = capsys.readouterr().out
    assert "dev (20 sentences), the weights of step" in printed and "best holdout accuracy" in printed
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # dev took no part in training or model choice: its scores are recorded as a test
    from rnnkit.train.metrics import read_metrics

    tests = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "test"]
    assert len(tests) == 1 and tests[0]["split"] == "dev" and 0 <= tests[0]["accuracy"] <= 1


def test_learns_the_word_lists(files: tuple[Path, Path]) -> None:
    config = _config(files, steps=60, eval_every=60, lr=1e-2)
    task, model, _ = sentiment.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    assert task.evaluate(model)["accuracy"] >= 0.9


def test_reads_shared_sst2() -> None:
    shared_file("sst2/dev.tsv")
    examples, _ = sentiment.read_split(sentiment.SentimentDataConfig(), "valid")
    assert len(examples) == 872 and {label for _, label in examples} == {"0", "1"}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_shares_of_validation_sum_to_the_whole_set(files: tuple[Path, Path],
                                                         world_size: int) -> None:
    """What a distributed validation all-reduces: the ranks' sums give the one-process metrics."""
    task, model, _ = sentiment.build(_config(files))
    whole = task.evaluate(model)
    shares = [task.evaluate_totals(model, rank, world_size) for rank in range(world_size)]
    assert sum(s["count"] for s in shares) == 20
    summed = task.metrics_from_totals({k: sum(s[k] for s in shares) for k in shares[0]})
    assert summed.keys() == whole.keys()
    for key, value in whole.items():
        assert summed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_folder_given_as_the_data_file_is_named_as_a_folder(files: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    """`rnnkit evaluate sst --data ../shared/data/atis` said the existing folder did not exist."""
    with pytest.raises(IsADirectoryError, match=r"is a folder, and this reader takes one file"):
        sentiment.build(_config((files[0], tmp_path)))


def test_typed_text_folds_case_only_for_a_lower_cased_vocabulary() -> None:
    # a cased run (--lowercase false) reads "Great" as its evaluation reads it in a file: an
    # unknown word, not the "great" it also holds; a lower-cased vocabulary still reads it so
    from rnnkit.data.text import Vocabulary

    cased = sentiment.TextEncoder(Vocabulary(["Great", "great", "film"]), None, lowercase=False)
    assert cased.tokens("Great film , Film") == ["Great", "film", ",", "Film"]
    uncased = sentiment.TextEncoder(Vocabulary(["great", "film"]), None, lowercase=False)
    assert uncased.tokens("Great Film") == ["great", "film"]
