"""Seq2seq: learns to reverse digit strings; beam search agrees with greedy and never does worse."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rnnkit.data.text import pad_sequences
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


PAD, BOS, EOS = 0, 2, 3  # the Vocabulary specials; digits are ids 4..13


def reversal_data(n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    sources = [[rng.randint(4, 13) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    return sources, [[*s[::-1], EOS] for s in sources]


def make_model(attention: str = "general", cell: str = "gru", seed: int = 0) -> Seq2Seq:
    torch.manual_seed(seed)
    return Seq2Seq(Seq2SeqConfig(
        source_vocab=14, target_vocab=14, embedding=16, attention=attention,
        encoder=RecurrentConfig(cell=cell, layers=1, hidden=32 if attention != "dot" else 16,
                                bidirectional=True),
        decoder=RecurrentConfig(cell=cell, layers=1, hidden=32)))


def train_reversal(model: Seq2Seq, steps: int, lr: float = 0.01) -> float:
    """Trains on fresh random batches; returns greedy exact-match accuracy on held-out strings."""
    sources, targets = reversal_data(200, seed=1)
    source, source_lengths = pad_sequences(sources)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    accuracy = 0.0
    for step in range(steps):
        batch_sources, batch_targets = reversal_data(64, seed=100 + step)
        s, s_lengths = pad_sequences(batch_sources)
        y, y_lengths = pad_sequences(batch_targets)
        loss = model.loss(s, s_lengths, y, y_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 24:  # stop as soon as it is perfect: keeps the test short
            decoded = model.greedy(source, source_lengths, max_length=10)
            accuracy = sum(p == t[:-1] for p, t in zip(decoded.tokens, targets)) / len(targets)
            if accuracy == 1.0:
                break
    return accuracy


@pytest.fixture(scope="module")
def trained() -> Seq2Seq:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model("general")
        accuracy = train_reversal(model, steps=400)
    finally:
        torch.set_num_threads(threads)
    model.accuracy = accuracy  # type: ignore[assignment]
    return model.eval()


def test_config_round_trips_and_checks() -> None:
    config = make_model("additive", "lstm").config
    assert Seq2SeqConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="bidirectional"):
        Seq2SeqConfig(source_vocab=5, target_vocab=5, decoder=RecurrentConfig(bidirectional=True))
    with pytest.raises(ValueError, match="dot attention"):
        Seq2Seq(Seq2SeqConfig(source_vocab=5, target_vocab=5, attention="dot",
                              encoder=RecurrentConfig(hidden=8, bidirectional=True),
                              decoder=RecurrentConfig(hidden=8)))


def test_learns_to_reverse_digit_strings(trained: Seq2Seq) -> None:
    assert trained.accuracy >= 0.97  # type: ignore[operator]


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["none", "additive", "dot"])
def test_learns_to_reverse_with_other_attentions(attention: str) -> None:
    # without attention the whole source must pass through one state: more steps, lower bar
    model = make_model(attention, cell="lstm")
    accuracy = train_reversal(model, steps=1500 if attention == "none" else 600)
    assert accuracy >= (0.9 if attention == "none" else 0.97)


@pytest.mark.parametrize("attention", ["none", "additive", "general", "dot"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_attention_weights_are_masked_distributions(attention: str, cell: str) -> None:
    model = make_model(attention, cell).eval()
    source = torch.randint(4, 14, (5, 3))
    source_lengths = torch.tensor([5, 2, 4])
    target = torch.randint(4, 14, (4, 3))
    logits, weights = model(source, source_lengths, target)
    assert logits.shape == (4, 3, 14)
    decoded = model.greedy(source, source_lengths, max_length=6)
    if attention == "none":
        assert weights is None and decoded.attention is None
        return
    assert weights is not None and weights.shape == (4, 3, 5)  # (T, B, S)
    torch.testing.assert_close(weights.sum(2), torch.ones(4, 3))
    for b, n in enumerate(source_lengths.tolist()):
        assert weights[:, b, n:].abs().sum() == 0
    # padding tokens past the source length change nothing
    noisy = source.clone()
    noisy[2:, 1] = 9
    torch.testing.assert_close(model(noisy, source_lengths, target)[0], logits)
    assert decoded.attention is not None and decoded.attention.shape[1:] == (3, 5)


def test_greedy_log_prob_matches_teacher_forced_scoring(trained: Seq2Seq) -> None:
    sources, _ = reversal_data(20, seed=5)
    source, source_lengths = pad_sequences(sources)
    decoded = trained.greedy(source, source_lengths, max_length=10)
    target, target_lengths = pad_sequences([[*t, EOS] for t in decoded.tokens])
    scored = trained.sequence_log_prob(source, source_lengths, target, target_lengths)
    expected = torch.tensor(decoded.log_probs, dtype=torch.float64)
    torch.testing.assert_close(scored.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_beam_width_one_is_greedy(trained: Seq2Seq, which: str) -> None:
    # the untrained model rarely says </s>: this also covers hitting max_length
    model = trained if which == "trained" else make_model("additive", "lstm", seed=3).eval()
    sources, _ = reversal_data(20, seed=6)
    source, source_lengths = pad_sequences(sources)
    greedy = model.greedy(source, source_lengths, max_length=8)
    beams = model.beam(source, source_lengths, beam_width=1, max_length=8)
    for b, (hypotheses, tokens, log_prob) in enumerate(zip(beams, greedy.tokens, greedy.log_probs)):
        assert hypotheses[0].tokens == tokens, f"sentence {b}"
        assert hypotheses[0].log_prob == pytest.approx(log_prob, abs=1e-4)


def test_beam_is_never_worse_than_greedy_in_log_probability(trained: Seq2Seq) -> None:
    sources, _ = reversal_data(20, seed=7)
    source, source_lengths = pad_sequences(sources)
    greedy = trained.greedy(source, source_lengths, max_length=10)
    beams = trained.beam(source, source_lengths, beam_width=4, max_length=10, nbest=3)
    for hypotheses, log_prob in zip(beams, greedy.log_probs):
        assert hypotheses[0].log_prob >= log_prob - 1e-5
        assert len(hypotheses) == 3
        assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
        assert len({tuple(h.tokens) for h in hypotheses}) == 3  # n-best entries are distinct
    best = beams[0][0]
    heat = trained.attention_map(source[: int(source_lengths[0]), 0], best.tokens)
    assert heat is not None and heat.shape == (len(best.tokens) + 1, int(source_lengths[0]))


def test_scheduled_sampling_feeds_back_the_models_own_predictions() -> None:
    model = make_model("general").eval()
    source = torch.randint(4, 14, (4, 2))
    source_lengths = torch.tensor([4, 3])
    target = torch.randint(4, 14, (5, 2))
    # with teacher_forcing 0 every input is the previous argmax: the logits are greedy's logits
    logits, _ = model(source, source_lengths, target, teacher_forcing=0.0)
    decoded = model.greedy(source, source_lengths, max_length=5)
    for b, tokens in enumerate(decoded.tokens):
        assert logits[: len(tokens), b].argmax(-1).tolist() == tokens
    model.train()
    loss = model.loss(source, source_lengths, target, torch.tensor([5, 2]), teacher_forcing=0.5)
    loss.backward()
    assert model.source_embedding.weight.grad is not None
    with pytest.raises(ValueError, match="teacher_forcing"):
        model(source, source_lengths, target, teacher_forcing=1.5)


@pytest.mark.parametrize("attention", ["none", "general"])
def test_teacher_forced_forward_equals_stepping_the_decoder(attention: str) -> None:
    # without attention forward() runs the decoder as one layer call: it must equal the steps
    model = make_model(attention, "lstm").eval()
    source, source_lengths = torch.randint(4, 14, (5, 2)), torch.tensor([5, 3])
    target = torch.randint(4, 14, (4, 2))
    logits, _ = model(source, source_lengths, target)
    state = model.encode(source, source_lengths)
    stepped = []
    for tokens in model.decoder_inputs(target):
        step_logits, _, state = model.step(tokens, state)
        stepped.append(step_logits)
    torch.testing.assert_close(logits, torch.stack(stepped), atol=1e-5, rtol=1e-5)
