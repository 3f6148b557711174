"""Piano-roll generator: the Bernoulli NLL by hand, a repeating pattern learnt and continued."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rnnkit.models.generator import FrameGenerator, GeneratorConfig, frame_nll
from rnnkit.models.recurrent import RecurrentConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


CHORDS = [(39, 43, 46), (44, 48, 51), (46, 50, 53), (41, 44, 48)]  # four chords, 88-key indices


def pattern(steps: int, phase: int) -> torch.Tensor:
    """(steps, 88) 0/1: the chords cycling from ``phase``."""
    roll = torch.zeros(steps, 88)
    for t in range(steps):
        roll[t, list(CHORDS[(t + phase) % len(CHORDS)])] = 1.0
    return roll


def test_nll_equals_a_hand_computation() -> None:
    logits = torch.tensor([[[0.0, 2.0]], [[-1.0, 0.5]], [[3.0, 3.0]]])  # (T=3, B=1, P=2)
    targets = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    step0 = -math.log(sig(0.0)) - math.log(1 - sig(2.0))
    step1 = -math.log(1 - sig(-1.0)) - math.log(sig(0.5))
    step2 = -2 * math.log(sig(3.0))
    assert frame_nll(logits, targets).item() == pytest.approx((step0 + step1 + step2) / 3, rel=1e-6)
    mask = torch.tensor([[True], [True], [False]])  # the third step is padding
    assert frame_nll(logits, targets, mask).item() == pytest.approx((step0 + step1) / 2, rel=1e-6)


def test_config_round_trips_and_lengths_mask_the_loss() -> None:
    config = GeneratorConfig(recurrent=RecurrentConfig(cell="gru", layers=2, hidden=8))
    assert GeneratorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = FrameGenerator(config)
    rolls = torch.stack([pattern(6, 0), pattern(6, 1)], dim=1)  # (T, B, 88)
    short = model.loss(rolls[:4, 1:], torch.tensor([4]))
    padded = rolls.clone()
    padded[4:, 1] = 1.0  # garbage after sequence 1's end
    loss = model.loss(padded, torch.tensor([6, 4]))
    full = model.loss(rolls[:, :1])
    # batch loss = predictions of both sequences pooled: (5 · full + 3 · short) / 8
    torch.testing.assert_close(loss, (5 * full + 3 * short) / 8)


def test_learns_and_continues_a_repeating_pattern() -> None:
    model = FrameGenerator(GeneratorConfig(recurrent=RecurrentConfig(cell="lstm", layers=1, hidden=32)))
    batch = torch.stack([pattern(12, phase) for phase in range(4)], dim=1)  # (12, 4, 88)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(250):
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05  # nats per time step, over all 88 pitches
    model.eval()
    continued = model.sample(pattern(2, 1), steps=10, temperature=0.0)
    assert torch.equal(continued, pattern(12, 1))
    # sampling at temperature 1 from a confident model gives the same, and a seed repeats itself
    a = model.sample(pattern(2, 3), steps=6, temperature=1.0, seed=1)
    b = model.sample(pattern(2, 3), steps=6, temperature=1.0, seed=1)
    assert torch.equal(a, b)
    assert (a != pattern(8, 3)).sum() <= 2


def test_bad_inputs_are_refused() -> None:
    model = FrameGenerator(GeneratorConfig(pitches=4, recurrent=RecurrentConfig(layers=1, hidden=4)))
    with pytest.raises(ValueError, match="primer"):
        model.sample(torch.zeros(2, 5), steps=1)
    with pytest.raises(ValueError, match="two frames"):
        model.loss(torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="bidirectional"):
        GeneratorConfig(recurrent=RecurrentConfig(bidirectional=True))
