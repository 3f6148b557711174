"""The word-level LM task on a tiny generated PTB-style corpus."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import shared_file
from rnnkit.tasks import wordlm
from rnnkit.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("ptb")
    lines = [" the cat sat on the mat", " a dog ran to the <unk>", " the dog sat"] * 20
    (directory / "train.txt").write_text("\n".join(lines) + "\n")
    (directory / "valid.txt").write_text(" the cat ran to a zebra\n the dog sat on a mat\n" * 3)
    return directory / "train.txt", directory / "valid.txt"


def _config(corpus: tuple[Path, Path], **train: object) -> dict:
    config = wordlm.default_config()
    config["data"].update(train=str(corpus[0]), valid=str(corpus[1]), seq_len=5, eval_batch_size=2)
    config["model"].update(hidden=16, embedding=8)
    config["train"].update({"steps": 4, "batch_size": 4, "eval_every": 2, **train})
    return config


def test_preset_is_zaremba_small() -> None:
    config = wordlm.default_config()
    assert config["model"]["layers"] == 2 and config["model"]["hidden"] == 200
    assert config["model"]["embedding"] == 200 and config["model"]["dropout"] == 0.0
    train = config["train"]
    # lr 1 and clipping at 5 for a loss summed over 35 steps = lr 35, clip 5/35 for the mean
    assert (train["optimizer"], train["lr"], train["batch_size"]) == ("sgd", 35.0, 20)
    assert train["clip_norm"] == pytest.approx(5 / 35)
    assert config["data"]["seq_len"] == 35 and train["steps"] == 13 * train["eval_every"]


def test_stream_windows_continue_and_vocab(corpus: tuple[Path, Path]) -> None:
    task, model, _ = wordlm.build(_config(corpus))
    assert "<eos>" in task.vocab and len(task.vocab) == model.config.vocab_size == 11
    # 60 sentences of 7, 7 and 4 words + <eos> = 20 · (7 + 7 + 4) words: 4 rows of 90
    assert task.train_stream.shape == (90, 4) and task.num_batches() == 18
    first, second = task.batch(0), task.batch(1)
    assert not first.continues and second.continues
    assert torch.equal(first.targets[:-1], first.inputs[1:])
    assert torch.equal(second.inputs[0], first.targets[-1])  # each row goes on where it stopped
    assert not task.batch(task.num_batches()).continues  # a new epoch starts the rows over
    # a word never seen in training ("zebra") reads as <unk>
    assert task.counts["valid words"] == 6 * 7
    parameters = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float(parameters.abs().max()) <= 0.1  # uniform ±0.1 initialisation


def test_training_carries_state_and_checkpoints(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    config = _config(corpus)
    task, model, _ = wordlm.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    result = trainer.fit()
    trainer.out_dir = tmp_path  # a checkpoint without the end-of-run plot: keeps the test fast
    trainer.save()
    assert trainer.carry is not None  # the state crossed window boundaries
    assert math.isclose(result.valid["ppl"], math.exp(result.valid["loss"]), rel_tol=1e-9)
    loaded, vocab, _ = wordlm.load_model(tmp_path)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert wordlm.perplexity(loaded, vocab, corpus[1], seq_len=5, batch_size=2) == pytest.approx(
        result.valid["ppl"], rel=1e-5)
    words = wordlm.sample(loaded, vocab, ["the"], words=5)
    assert words[0] == "the" and len(words) == 6 and all(w in vocab for w in words)


def test_learns_the_corpus(corpus: tuple[Path, Path]) -> None:
    config = _config(corpus, steps=90, eval_every=90, optimizer="adam", lr=1e-2)
    task, model, _ = wordlm.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    # on text like the training text; from about 11 (uniform over the 11 words)
    assert wordlm.perplexity(model, task.vocab, corpus[0], seq_len=5, batch_size=2) < 6.0


def test_reads_shared_ptb() -> None:
    path = shared_file("ptb/ptb.valid.txt")
    words, _ = wordlm.read_words(path)
    assert len(words) == 73_760 and words.count("<eos>") == 3_370
