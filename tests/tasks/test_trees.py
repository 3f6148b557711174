"""The trees task: Tree-LSTMs and sequence models on tiny generated trees (SST when present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import shared_file
from rnnkit.tasks import trees
from rnnkit.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


GOOD, BAD = ["great", "fine", "lovely"], ["awful", "dull", "bad"]


def tree_line(positive: bool, picks: list[int]) -> str:
    """(label (2 the) (2 (2 film) (label word))) with the sentiment word deciding every label."""
    label = 4 if positive else 0
    word = (GOOD if positive else BAD)[picks[0]]
    return f"({label} (2 the) ({label} (2 film) ({label} {word})))"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("sst-trees")
    generator = torch.Generator().manual_seed(0)

    def lines(count: int) -> list[str]:
        return [tree_line(i % 2 == 0, torch.randint(3, (1,), generator=generator).tolist())
                for i in range(count)]

    train, dev = directory / "train.txt", directory / "dev.txt"
    train.write_text("\n".join(lines(40)) + "\n")
    dev.write_text("\n".join([*lines(12), "(2 (2 so) (2 so))"]) + "\n")
    return train, dev


def _config(files: tuple[Path, Path], encoder: str, **train: object) -> dict:
    config = trees.default_config()
    config["data"].update(train=str(files[0]), valid=str(files[1]))
    config["model"].update(encoder=encoder, embedding=8, hidden=8, dropout=0.0)
    config["train"].update({"steps": 40, "batch_size": 8, "eval_every": 40, "lr": 1e-2, **train})
    return config


@pytest.mark.parametrize("encoder", ["treelstm", "childsum", "lstm", "tcn"])
def test_every_encoder_learns_the_word_lists(files: tuple[Path, Path], encoder: str,
                                              tmp_path: Path) -> None:
    config = _config(files, encoder)
    task, model, source = trees.build(config)
    assert "40 trees" in source and len(task.valid) == 12  # the neutral dev root is dropped
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    trainer.fit()
    assert task.evaluate(model)["accuracy"] >= 0.9
    trainer.out_dir = tmp_path
    trainer.save()
    loaded, data, vocab, _ = trees.load_model(tmp_path)
    assert data.classes == "binary" and "great" in vocab
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_phrases_train_the_sequence_models(files: tuple[Path, Path]) -> None:
    task, _, _ = trees.build(_config(files, "gru"))
    # distinct labelled phrases: the three sentiment words, "film <w>" and "the film <w>" for
    # each of six words; the neutral "the" and "film" are dropped in the binary task
    assert len(task.phrases) == 18
    fine, _, _ = trees.build({**_config(files, "gru"), "data": {**_config(files, "gru")["data"],
                                                                 "classes": "fine"}})
    assert len(fine.phrases) == 20 and fine.labels[2] == "neutral"


def test_tree_batches_keep_every_labelled_node(files: tuple[Path, Path]) -> None:
    task, model, _ = trees.build(_config(files, "treelstm"))
    batch = task.batch(0)
    labels = batch.targets[0]
    assert batch.time_slice(0, batch.length) is batch
    assert labels.numel() == 5 * 8 and set(labels.tolist()) <= {-100, 0, 1}
    result = task.step(model, batch, None)
    assert result.tokens == int((labels != -100).sum()) == 3 * 8


def test_reads_the_shared_trees() -> None:
    shared_file("sst-trees/dev.txt")
    config = trees.default_config()
    task, _, _ = trees.build(config)
    assert len(task.valid) == 872 and len(task.train) == 8544


def test_a_sequence_model_reads_a_typed_sentence_as_the_treebank_tokenised_it(
        files: tuple[Path, Path], tmp_path: Path) -> None:
    # SST's leaves split clitics and punctuation ("it 's great !"): a sentence typed as people
    # write it must reach the model as those known words, not as the unknown "it's" / "great!"
    import rnnkit

    config = _config(files, "lstm", steps=2)
    task, model, _ = trees.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    trainer.fit()
    trainer.out_dir = tmp_path
    trainer.save()
    typed, = rnnkit.load(tmp_path / "checkpoint.json").predict(["the film's great!"])
    assert typed.tokens == ["the", "film", "'s", "great", "!"]
    assert typed.unknown == ["'s", "!"]  # the word lists hold neither; "film" and "great" known


def test_the_pipeline_predicts_trees_and_evaluates_a_file_as_validation_does(
        files: tuple[Path, Path], tmp_path: Path) -> None:
    import rnnkit
    from rnnkit.pipelines import InputError

    config = _config(files, "treelstm")
    task, model, _ = trees.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    trainer.fit()
    trainer.out_dir = tmp_path
    trainer.save()
    pipe = rnnkit.load(tmp_path / "checkpoint.json")
    good, bad = pipe.predict(["(0 (2 the) (0 (2 film) (0 great)))", "(4 (2 the) (4 (2 film) (4 dull)))"])
    assert (good.label, bad.label) == ("positive", "negative")  # the labels in the input are ignored
    assert abs(sum(good.probabilities.values()) - 1) < 1e-6
    metrics = pipe.evaluate(files[1])
    expected = task.evaluate(model)
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5) and metrics["sentences"] == 12
    with pytest.raises(InputError, match="reads parse trees"):
        pipe.predict("the film was great")
