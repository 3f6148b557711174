"""Every model takes every cell variant through RecurrentConfig, trains a step, and round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from rnnkit.models.classifier import ClassifierConfig, SequenceClassifier
from rnnkit.models.generator import FrameGenerator, GeneratorConfig
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig
from rnnkit.models.tagger import Tagger, TaggerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


CELLS = {
    "lstm_peephole_coupled": dict(cell="lstm", peephole=True, coupled=True, forget_bias=1.0),
    "gru_before": dict(cell="gru", reset="before"),
    "rnn_relu": dict(cell="rnn", nonlinearity="relu"),
}


def recurrent(name: str, **options) -> RecurrentConfig:
    return RecurrentConfig(**{"layers": 2, "hidden": 6, "dropout": 0.1, **CELLS[name], **options})


def build(kind: str, name: str) -> tuple[torch.nn.Module, tuple]:
    lengths = torch.tensor([4, 2, 3])
    tokens = torch.randint(1, 9, (4, 3))
    if kind == "classifier":
        config = ClassifierConfig(classes=3, vocab_size=9, embedding=5, pooling="mean",
                                  recurrent=recurrent(name, bidirectional=True))
        return SequenceClassifier(config), (tokens, lengths, torch.tensor([0, 2, 1]))
    if kind == "tagger":
        config = TaggerConfig(vocab_size=9, tags=4, embedding=5, crf=True, chars=6, char_hidden=3,
                              intents=2, recurrent=recurrent(name, bidirectional=True))
        chars, char_lengths = torch.randint(1, 6, (4, 3, 3)), torch.randint(1, 4, (4, 3))
        return Tagger(config), (tokens, lengths, torch.randint(0, 4, (4, 3)), chars, char_lengths,
                                torch.tensor([0, 1, 1]))
    if kind == "seq2seq":
        config = Seq2SeqConfig(source_vocab=9, target_vocab=9, embedding=5, attention="additive",
                               encoder=recurrent(name, bidirectional=True), decoder=recurrent(name))
        return Seq2Seq(config), (tokens, lengths, tokens[:3], torch.tensor([3, 1, 2]))
    config = GeneratorConfig(pitches=7, recurrent=recurrent(name))
    return FrameGenerator(config), ((torch.rand(4, 3, 7) > 0.5).float(), lengths)


@pytest.mark.parametrize("kind", ["classifier", "tagger", "seq2seq", "generator"])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_model_trains_with_cell_variant_and_rebuilds_from_json(kind: str, name: str) -> None:
    model, batch = build(kind, name)
    loss = model.loss(*batch)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    # the config alone (as JSON, like a checkpoint's) rebuilds an identical model
    data = json.loads(json.dumps(model.config.to_dict()))
    again = type(model)(type(model.config).from_dict(data))
    again.load_state_dict(model.state_dict())
    model.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.loss(*batch), model.loss(*batch))
