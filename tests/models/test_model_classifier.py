"""Many-to-one classifier: pooling over valid steps only, configs round-trip, parity is learnt."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from rnnkit.data.text import pad_characters, pad_sequences
from rnnkit.models.classifier import (
    ClassifierConfig,
    SequenceClassifier,
    image_rows,
    pool,
    row_reader_config,
)
from rnnkit.models.recurrent import RecurrentConfig, build_recurrent

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_config_round_trips_through_json() -> None:
    config = ClassifierConfig(classes=3, vocab_size=10, pooling="max",
                              recurrent=RecurrentConfig(cell="gru", layers=2, hidden=8, bidirectional=True))
    again = ClassifierConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="pooling"):
        ClassifierConfig(vocab_size=3, pooling="sum")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_pooling_looks_only_at_valid_steps(cell: str) -> None:
    rnn = build_recurrent(RecurrentConfig(cell=cell, layers=2, hidden=5, bidirectional=True), 3)
    x = torch.randn(6, 3, 3)  # (T, B, I)
    lengths = torch.tensor([6, 2, 4])
    outputs, state = rnn(x, lengths=lengths)  # (T, B, 10)
    final = pool(outputs, state, lengths, "final", bidirectional=True)
    mean = pool(outputs, state, lengths, "mean", bidirectional=True)
    top = pool(outputs, state, lengths, "max", bidirectional=True)
    for b, n in enumerate(lengths.tolist()):
        # the forward half is the output after the last real step, the backward half after step 0
        torch.testing.assert_close(final[b, :5], outputs[n - 1, b, :5])
        torch.testing.assert_close(final[b, 5:], outputs[0, b, 5:])
        torch.testing.assert_close(mean[b], outputs[:n, b].mean(0))
        torch.testing.assert_close(top[b], outputs[:n, b].max(0).values)
    # garbage past the lengths must not change anything
    x2 = x.clone()
    x2[2:, 1] = 100.0
    outputs2, state2 = rnn(x2, lengths=lengths)
    torch.testing.assert_close(pool(outputs2, state2, lengths, "max", True), top)


def test_learns_parity_of_variable_length_bit_strings() -> None:
    strings = [list(s) for n in range(1, 9) for s in itertools.product([1, 2], repeat=n)]  # 0 = pad
    labels = torch.tensor([s.count(2) % 2 for s in strings])
    tokens, lengths = pad_sequences(strings)  # (8, 510)
    model = SequenceClassifier(ClassifierConfig(
        classes=2, vocab_size=3, embedding=8, recurrent=RecurrentConfig(cell="gru", layers=1, hidden=16)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    accuracy = 0.0
    for step in range(300):
        loss = model.loss(tokens, lengths, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 19:
            accuracy = (model.predict(tokens, lengths) == labels).float().mean().item()
            if accuracy == 1.0:
                break
    assert accuracy == 1.0


def test_character_features_tell_unseen_words_apart_and_are_required() -> None:
    torch.manual_seed(0)
    config = ClassifierConfig(classes=2, vocab_size=5, embedding=4, chars=6, char_embedding=3,
                              char_hidden=4, pooling="max",
                              recurrent=RecurrentConfig(layers=1, hidden=5, bidirectional=True))
    model = SequenceClassifier(config).eval()
    assert model.char_words is not None and model.rnn.input_size == 4 + 8
    unk = 1
    tokens = torch.tensor([[unk, unk], [2, 2]])  # (T, B): the same ids, different spellings
    spellings = [[[2, 3], [4]], [[5, 5, 5], [4]]]
    chars, char_lengths = pad_characters(spellings)
    logits = model(tokens, torch.tensor([2, 2]), chars, char_lengths)
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(ValueError, match="pass chars and char_lengths"):
        model(tokens, torch.tensor([2, 2]))
    # padding words are not read: a shorter sentence's padding characters change nothing
    short = model(tokens[:1, :1], torch.tensor([1]), chars[:1, :1], char_lengths[:1, :1])
    padded = model(tokens[:, :1], torch.tensor([1]), chars[:, :1], char_lengths[:, :1])
    assert torch.allclose(short, padded, atol=1e-6)
    with pytest.raises(ValueError, match="character features need token inputs"):
        ClassifierConfig(embedding=0, input_size=3, chars=4)


def test_row_reader_reads_images_row_by_row() -> None:
    images = torch.rand(4, 8, 6)  # (B, H, W)
    rows = image_rows(images)  # (H, B, W)
    assert rows.shape == (8, 4, 6)
    torch.testing.assert_close(rows[3, 2], images[2, 3])
    model = SequenceClassifier(row_reader_config(6, 10, RecurrentConfig(layers=1, hidden=8)))
    assert model(rows).shape == (4, 10)


@pytest.mark.slow
def test_row_reader_on_sklearn_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    model = SequenceClassifier(row_reader_config(8, 10, RecurrentConfig(cell="lstm", layers=1, hidden=64)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    shuffle = torch.Generator().manual_seed(1)
    for _ in range(40):
        for batch in train[torch.randperm(len(train), generator=shuffle)].split(64):
            loss = model.loss(image_rows(images[batch]), None, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    accuracy = (model.predict(image_rows(images[test])) == labels[test]).float().mean().item()
    assert accuracy >= 0.97  # the task target; ≈0.98 after 40 epochs
