"""CTC: the loss against torch's, its errors, and greedy / beam / LM-fused decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnkit.decoding import decode_batch, greedy_decode, prefix_beam_search
from rnnkit.losses import CTCLoss, ctc_loss


def _random_batch(dtype: torch.dtype, blank: int, classes: int = 6, batch: int = 7,
                  steps: int = 20):
    generator = torch.Generator().manual_seed(1234 + blank)
    logits = torch.randn(steps, batch, classes, dtype=dtype, generator=generator)
    target_lengths = torch.tensor([5, 0, 3, 6, 1, 4, 2])[:batch]
    input_lengths = torch.tensor([20, 9, 7, 20, 3, 15, 11])[:batch]
    labels = [c for c in range(classes) if c != blank]
    width = int(target_lengths.max())
    choice = torch.randint(0, len(labels), (batch, width), generator=generator)
    targets = torch.tensor(labels)[choice]
    targets[3] = torch.tensor([labels[0], labels[0], labels[1], labels[1], labels[1], labels[2]])
    return logits, targets, input_lengths, target_lengths


def _loss_and_grads(fn, logits, targets, input_lengths, target_lengths, **options):
    through_softmax = logits.clone().requires_grad_()
    loss = fn(through_softmax.log_softmax(2), targets, input_lengths, target_lengths, **options)
    (d_logits,) = torch.autograd.grad(loss.sum(), through_softmax)
    leaf = logits.log_softmax(2).detach().requires_grad_()
    (d_log_probs,) = torch.autograd.grad(
        fn(leaf, targets, input_lengths, target_lengths, **options).sum(), leaf)
    return loss, d_logits, d_log_probs


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.float64, 1e-8)])
@pytest.mark.parametrize("blank", [0, 5])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("layout", ["padded", "concatenated"])
def test_loss_and_gradients_equal_torch(dtype, tolerance, blank, reduction, layout) -> None:
    logits, targets, input_lengths, target_lengths = _random_batch(dtype, blank)
    if layout == "concatenated":
        targets = torch.cat([row[:n] for row, n in zip(targets, target_lengths.tolist())])
    options = dict(blank=blank, reduction=reduction)
    ours = _loss_and_grads(ctc_loss, logits, targets, input_lengths, target_lengths, **options)
    theirs = _loss_and_grads(F.ctc_loss, logits, targets, input_lengths, target_lengths,
                             **options)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_bit_identical_across_runs() -> None:
    logits, targets, input_lengths, target_lengths = _random_batch(torch.float32, 0)
    first = _loss_and_grads(ctc_loss, logits, targets, input_lengths, target_lengths)
    second = _loss_and_grads(ctc_loss, logits, targets, input_lengths, target_lengths)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_impossible_alignment_is_a_clear_error_or_zero() -> None:
    log_probs = torch.randn(4, 2, 3).log_softmax(2)
    targets = torch.tensor([[1, 1, 2], [1, 2, 1]])
    # sample 0 needs 4 frames (3 labels + 1 blank between the repeated 1s) but has 3
    input_lengths, target_lengths = torch.tensor([3, 4]), torch.tensor([3, 3])
    with pytest.raises(ValueError, match=r"sample 0: its input length is 3 frames but its 3 "
                                         r"labels need at least 4"):
        ctc_loss(log_probs, targets, input_lengths, target_lengths)
    leaf = log_probs.clone().requires_grad_()
    losses = ctc_loss(leaf, targets, input_lengths, target_lengths, reduction="none",
                      zero_infinity=True)
    expected = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="none",
                          zero_infinity=True)
    assert losses[0] == 0 and torch.isfinite(losses).all()
    torch.testing.assert_close(losses, expected)
    losses.sum().backward()
    assert not leaf.grad[:, 0].any() and torch.isfinite(leaf.grad).all()


def test_module_and_argument_errors() -> None:
    log_probs = torch.randn(5, 2, 4).log_softmax(2)
    targets, lengths = torch.tensor([[1, 2], [3, 3]]), torch.tensor([5, 5])
    loss = CTCLoss(blank=0, reduction="sum")(log_probs, targets, lengths, torch.tensor([2, 2]))
    torch.testing.assert_close(loss, F.ctc_loss(log_probs, targets, lengths, torch.tensor([2, 2]),
                                                reduction="sum"))
    with pytest.raises(ValueError, match="blank index 4 is outside the 4 classes"):
        ctc_loss(log_probs, targets, lengths, torch.tensor([2, 2]), blank=4)
    with pytest.raises(ValueError, match="exceeds the 5 frames"):
        ctc_loss(log_probs, targets, torch.tensor([6, 5]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        CTCLoss(reduction="avg")


def _peaked(labels_per_frame: list[int], classes: int = 5, confidence: float = 0.97) -> torch.Tensor:
    probs = torch.full((len(labels_per_frame), classes), (1 - confidence) / (classes - 1))
    for t, label in enumerate(labels_per_frame):
        probs[t, label] = confidence
    return probs.log()


def test_greedy_collapses_repeats_and_drops_blanks() -> None:
    hypothesis = greedy_decode(_peaked([0, 1, 1, 0, 1, 2, 2, 0, 0, 3]))
    assert hypothesis.labels == [1, 1, 2, 3]
    assert hypothesis.timesteps == [1, 4, 5, 9]


def test_greedy_and_beam_agree_on_peaked_distributions() -> None:
    frames = [0, 2, 2, 0, 2, 0, 4, 4, 1, 0]
    greedy = greedy_decode(_peaked(frames))
    beam = prefix_beam_search(_peaked(frames), beam_width=6)
    assert beam[0].labels == greedy.labels == [2, 2, 4, 1]
    assert beam[0].timesteps == greedy.timesteps


def _likelihood(log_probs: torch.Tensor, labels: list[int]) -> float:
    """log P(labels | x) summed over every alignment, by the CTC loss."""
    frames = log_probs.shape[0]
    return -float(ctc_loss(log_probs.unsqueeze(1).double(), torch.tensor([labels or [1]]),
                           [frames], [len(labels)], reduction="sum"))


def test_beam_is_at_least_as_likely_as_greedy_on_random_outputs() -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        log_probs = (torch.randn(12, 4, generator=generator) * 1.5).log_softmax(1)
        greedy = greedy_decode(log_probs)
        best = prefix_beam_search(log_probs, beam_width=8)[0]
        # the beam's prefix probability is a lower bound of the exact one (pruned alignments)
        assert best.log_prob <= _likelihood(log_probs, best.labels) + 1e-9
        assert best.log_prob >= greedy.log_prob - 1e-12


def test_unpruned_beam_finds_the_exact_prefix_probabilities() -> None:
    log_probs = torch.randn(5, 3, generator=torch.Generator().manual_seed(3)).double().log_softmax(1)
    hypotheses = prefix_beam_search(log_probs, beam_width=10_000)
    # all 2^0 + ... + 2^5 prefixes over two labels survive; their probabilities sum to 1
    assert math.isclose(sum(math.exp(h.log_prob) for h in hypotheses), 1.0, rel_tol=1e-9)
    for h in hypotheses[:10]:
        assert h.log_prob == pytest.approx(_likelihood(log_probs, h.labels), abs=1e-9)


def test_beam_of_width_one_returns_one_hypothesis_and_nbest_are_sorted() -> None:
    log_probs = torch.randn(8, 4).log_softmax(1)
    assert len(prefix_beam_search(log_probs, beam_width=1)) == 1
    hypotheses = prefix_beam_search(log_probs, beam_width=5)
    scores = [h.score for h in hypotheses]
    assert scores == sorted(scores, reverse=True) and len(set(map(tuple, (h.labels for h in
                                                                          hypotheses)))) == 5


class _BigramScorer:
    """A toy label LM: a fixed table of log P(next | previous)."""

    def __init__(self, table: dict[tuple[int, int], float], default: float) -> None:
        self.table, self.default = table, default

    def initial_state(self) -> int:
        return -1

    def score(self, state: int, label: int) -> tuple[float, int]:
        return self.table.get((state, label), self.default), label


def test_language_model_fusion_changes_the_ranking() -> None:
    # acoustics slightly prefer "1 2" over "1 3"; the LM strongly prefers 3 after 1
    probs = torch.tensor([
        [0.05, 0.90, 0.02, 0.02, 0.01],
        [0.05, 0.02, 0.48, 0.44, 0.01],
    ])
    log_probs = probs.log()
    plain = prefix_beam_search(log_probs, beam_width=4)
    assert plain[0].labels == [1, 2]
    lm = _BigramScorer({(-1, 1): math.log(0.9), (1, 3): math.log(0.9), (1, 2): math.log(0.01)},
                       default=math.log(0.05))
    fused = prefix_beam_search(log_probs, beam_width=4, lm=lm, alpha=1.0)
    assert fused[0].labels == [1, 3]
    assert fused[0].lm_log_prob == pytest.approx(2 * math.log(0.9))
    assert fused[0].score == pytest.approx(fused[0].log_prob + fused[0].lm_log_prob)
    # an insertion bonus counters the LM's and CTC's preference for short outputs
    short = prefix_beam_search(log_probs, beam_width=4, lm=lm, alpha=1.0, beta=-20.0)
    assert len(short[0].labels) < 2


def test_decode_batch_uses_each_length() -> None:
    log_probs = torch.stack([_peaked([1, 0, 2, 3]), _peaked([3, 3, 0, 1])], dim=1)
    greedy = decode_batch(log_probs, lengths=[3, 4])
    assert [h.labels for h in greedy] == [[1, 2], [3, 1]]
    beam = decode_batch(log_probs, lengths=[3, 4], beam_width=4)
    assert [h.labels for h in beam] == [[1, 2], [3, 1]]
