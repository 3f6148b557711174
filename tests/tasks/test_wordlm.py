"""The word-level LM task on a tiny generated PTB-style corpus."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import shared_file
from rnnkit.models.language_model import LanguageModel, LMConfig
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


def test_tied_weights_share_one_matrix(corpus: tuple[Path, Path]) -> None:
    config = _config(corpus)
    config["model"].update(hidden=8, embedding=8, tie_weights=True)
    task, model, _ = wordlm.build(config)
    assert model.decoder.weight is model.embedding.weight
    # stored once: the checkpoint has no second name for the matrix
    assert "decoder.weight" not in model.state_dict() and "decoder.bias" in model.state_dict()
    untied_config = LMConfig.from_dict({**model.config.to_dict(), "tie_weights": False})
    untied = LanguageModel(untied_config)
    untied.load_state_dict({**model.state_dict(), "decoder.weight": model.embedding.weight})
    assert sum(p.numel() for p in untied.parameters()) - sum(
        p.numel() for p in model.parameters()) == 11 * 8
    # the one matrix gets the gradient of both of its uses: the untied model's two gradients
    tokens = task.batch(0).inputs
    for m in (model, untied):
        m.eval()
        m.zero_grad()
        m(tokens)[0].logsumexp(-1).sum().backward()
    assert torch.allclose(model(tokens)[0], untied(tokens)[0])
    assert untied.embedding.weight.grad.abs().sum() > 0 and untied.decoder.weight.grad.abs().sum() > 0
    torch.testing.assert_close(model.embedding.weight.grad,
                               untied.embedding.weight.grad + untied.decoder.weight.grad)


def test_tied_model_trains_saves_loads_predicts_and_exports(corpus: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    config = _config(corpus)
    config["model"].update(hidden=8, embedding=8, tie_weights=True)
    task, model, _ = wordlm.build(config)
    before = model.embedding.weight.detach().clone()
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    result = trainer.fit()
    trainer.out_dir = tmp_path
    trainer.save()
    assert not torch.equal(model.embedding.weight, before)
    assert model.decoder.weight is model.embedding.weight  # still one tensor after the updates
    loaded, vocab, _ = wordlm.load_model(tmp_path)
    assert loaded.decoder.weight is loaded.embedding.weight
    assert torch.equal(loaded.embedding.weight, model.embedding.weight)
    assert wordlm.perplexity(loaded, vocab, corpus[1], seq_len=5, batch_size=2) == pytest.approx(
        result.valid["ppl"], rel=1e-5)
    import rnnkit

    continued = rnnkit.load(tmp_path).predict("the cat")
    assert str(continued).startswith("the cat")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed")
    from rnnkit.export import export_onnx

    tokens = task.batch(0).inputs
    path = export_onnx(loaded.eval(), (tokens,), tmp_path / "tied.onnx")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]
    with torch.no_grad():
        want = loaded(tokens)[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)


def test_tied_weights_need_equal_sizes() -> None:
    with pytest.raises(ValueError, match="embedding size equal to the last layer's hidden size, "
                                         "got embedding=8 and hidden=16"):
        LMConfig(vocab_size=11, hidden=16, embedding=8, tie_weights=True)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> dict:
    """An example config file merged over the task's defaults, as ``--config`` merges it."""
    from rnnkit.options import read_config_file
    from rnnkit.tasks import task_schema

    schema = task_schema("wordlm")
    path = EXAMPLES / name
    return schema.merge(schema.defaults, read_config_file(path), str(path))


def test_medium_example_is_zaremba_medium() -> None:
    config = _example("ptb-medium.yaml")
    model, train, data = config["model"], TrainConfig.from_dict(config["train"]), config["data"]
    assert (model["cell"], model["layers"], model["hidden"], model["embedding"]) == (
        "lstm", 2, 650, 650)
    assert model["dropout"] == 0.5 and not model["tie_weights"] and data["init_scale"] == 0.05
    # lr 1 and clipping at 5 on their summed-over-35-steps scale, as the small preset converts
    assert (train.optimizer, train.lr, train.batch_size) == ("sgd", 35.0, 20)
    assert train.clip_norm == pytest.approx(5 / 35) and data["seq_len"] == 35
    assert train.eval_every == wordlm.PTB_WINDOWS and train.steps == 39 * wordlm.PTB_WINDOWS
    assert (train.schedule, train.decay_after) == ("step", 6)
    assert train.decay_factor == pytest.approx(1 / 1.2)


def test_90_minute_example_is_tied_and_decays_over_its_budget() -> None:
    config = _example("ptb-90min.yaml")
    model = LMConfig.from_dict({**config["model"], "vocab_size": 10_000})  # sizes fit the tie
    train = TrainConfig.from_dict(config["train"])
    assert model.tie_weights and model.embedding == model.hidden and model.dropout > 0
    assert (train.steps, train.minutes, train.schedule) == (None, 90, "budget")
    assert (train.optimizer, train.lr) == ("sgd", 35.0) and train.clip_norm == pytest.approx(5 / 35)
