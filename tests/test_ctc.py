"""CTC: the loss against torch's, its errors, and greedy / beam / LM-fused decoding."""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from rnnkit.decoding import decode_batch, greedy_decode, prefix_beam_search
from rnnkit.losses import CTCLoss, ctc, ctc_loss
from rnnkit.native import NativeExtension

BACKENDS = ["native", "python"]


@pytest.fixture(scope="module")
def native_available() -> None:
    """Skips a test when the C++ kernel cannot be built here (the first call compiles it)."""
    reason = ctc.native_unavailable_reason()
    if reason is not None:
        pytest.skip(f"native CTC kernel unavailable: {reason}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "native":
        request.getfixturevalue("native_available")
    return request.param


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
def test_loss_and_gradients_equal_torch(dtype, tolerance, blank, reduction, layout,
                                        backend) -> None:
    # the batch has repeated labels, an empty target and input lengths shorter than T
    logits, targets, input_lengths, target_lengths = _random_batch(dtype, blank)
    if layout == "concatenated":
        targets = torch.cat([row[:n] for row, n in zip(targets, target_lengths.tolist())])
    options = dict(blank=blank, reduction=reduction)
    ours = _loss_and_grads(partial(ctc_loss, backend=backend), logits, targets, input_lengths,
                           target_lengths, **options)
    theirs = _loss_and_grads(F.ctc_loss, logits, targets, input_lengths, target_lengths,
                             **options)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_bit_identical_across_runs(backend) -> None:
    logits, targets, input_lengths, target_lengths = _random_batch(torch.float32, 0)
    fn = partial(ctc_loss, backend=backend)
    first = _loss_and_grads(fn, logits, targets, input_lengths, target_lengths)
    second = _loss_and_grads(fn, logits, targets, input_lengths, target_lengths)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _long_batch(dtype: torch.dtype, seed: int, steps: int = 80, batch: int = 9, classes: int = 12,
                blank: int = 0, scale: float = 1.0):
    """A larger batch: varied lengths, runs of repeated labels, an empty target, a zero-length
    input with an empty target, and logits scaled up for peaked (large-magnitude) log-probs."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, batch, classes, dtype=dtype, generator=generator) * scale
    labels = torch.tensor([c for c in range(classes) if c != blank])
    target_lengths = torch.randint(1, 30, (batch,), generator=generator)
    target_lengths[0], target_lengths[1] = 0, 0
    width = int(target_lengths.max())
    targets = labels[torch.randint(0, len(labels), (batch, width), generator=generator)]
    targets[2, :6] = labels[3]  # a run of repeats: each needs a blank between
    input_lengths = torch.randint(steps // 2, steps + 1, (batch,), generator=generator)
    input_lengths[0], input_lengths[2] = 0, steps
    return logits, targets, input_lengths, target_lengths


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.float64, 1e-8)])
@pytest.mark.parametrize("blank", [0, 11])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_native_equals_python_and_torch_on_long_sequences(native_available, dtype, tolerance,
                                                          blank, scale) -> None:
    logits, targets, input_lengths, target_lengths = _long_batch(dtype, 5, blank=blank,
                                                                 scale=scale)
    options = dict(blank=blank, reduction="none", zero_infinity=True)
    native = _loss_and_grads(partial(ctc_loss, backend="native"), logits, targets, input_lengths,
                             target_lengths, **options)
    python = _loss_and_grads(partial(ctc_loss, backend="python"), logits, targets, input_lengths,
                             target_lengths, **options)
    theirs = _loss_and_grads(F.ctc_loss, logits, targets, input_lengths, target_lengths,
                             **options)
    for got, reference, want in zip(native, python, theirs):
        # relative to the loss scale: peaked log-probs make losses of thousands of nats
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(got, reference, rtol=tolerance, atol=tolerance)


def test_native_is_bit_identical_across_thread_counts(native_available) -> None:
    logits, targets, input_lengths, target_lengths = _long_batch(torch.float32, 9, batch=16)
    fn = partial(ctc_loss, backend="native", reduction="sum", zero_infinity=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _loss_and_grads(fn, logits, targets, input_lengths, target_lengths)
        torch.set_num_threads(2)
        double = _loss_and_grads(fn, logits, targets, input_lengths, target_lengths)
        again = _loss_and_grads(fn, logits, targets, input_lengths, target_lengths)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, double, again):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_native_without_grad_and_from_a_strided_view(native_available) -> None:
    logits, targets, input_lengths, target_lengths = _random_batch(torch.float32, 0)
    log_probs = logits.log_softmax(2)
    batch_first = log_probs.transpose(0, 1).contiguous()  # (N, T, C), viewed back as (T, N, C)
    got = ctc_loss(batch_first.transpose(0, 1), targets, input_lengths, target_lengths,
                   reduction="none", backend="native")
    want = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the kernel then skips the gradient; the loss is the same
        got = ctc_loss(log_probs.clone().requires_grad_(), targets, input_lengths, target_lengths,
                       reduction="none", backend="native")
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # int32 targets and lengths given as lists are accepted as torch accepts them
    got = ctc_loss(log_probs, targets.int(), input_lengths.tolist(), target_lengths.tolist(),
                   backend="native")
    torch.testing.assert_close(got, F.ctc_loss(log_probs, targets, input_lengths, target_lengths),
                               rtol=1e-5, atol=1e-5)


def test_minus_infinity_log_probs_match_torch(backend) -> None:
    log_probs = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(2)).log_softmax(2)
    log_probs[2, 0, 3] = float("-inf")  # a class outside sample 0's labels: still alignable
    log_probs[:, 1, 2] = float("-inf")  # a label of sample 1 never emitted: no alignment
    targets, input_lengths, target_lengths = torch.tensor([[1, 2], [2, 1]]), [6, 6], [2, 2]
    for zero_infinity in (False, True):
        options = dict(reduction="none", zero_infinity=zero_infinity)
        grads = []
        for fn in (partial(ctc_loss, backend=backend), F.ctc_loss):
            leaf = log_probs.clone().requires_grad_()
            loss = fn(leaf, targets, input_lengths, target_lengths, **options)
            loss.sum().backward()
            grads.append((loss.detach(), leaf.grad))
        (loss, grad), (want_loss, want_grad) = grads
        torch.testing.assert_close(loss, want_loss, equal_nan=True)
        torch.testing.assert_close(grad, want_grad, equal_nan=True, rtol=1e-4, atol=1e-4)


def test_native_unavailable_falls_back_with_one_warning(monkeypatch) -> None:
    monkeypatch.setenv("RNNKIT_NO_NATIVE", "1")
    disabled = NativeExtension("rnnkit_test_disabled", ["missing.cpp"], ops_namespace="nowhere")
    assert disabled.load() is None and disabled.error == "disabled by RNNKIT_NO_NATIVE"
    monkeypatch.setattr(ctc, "_EXTENSION", disabled)
    logits, targets, input_lengths, target_lengths = _random_batch(torch.float64, 0)
    log_probs = logits.log_softmax(2)
    with pytest.warns(RuntimeWarning, match="native CTC kernel is unavailable .disabled by "
                                            "RNNKIT_NO_NATIVE.; using the slower pure-torch"):
        loss = ctc_loss(log_probs, targets, input_lengths, target_lengths)
    torch.testing.assert_close(loss, F.ctc_loss(log_probs, targets, input_lengths, target_lengths))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough: the second call is silent
        ctc_loss(log_probs, targets, input_lengths, target_lengths)
    with pytest.raises(RuntimeError, match="native CTC kernel is unavailable: disabled"):
        ctc_loss(log_probs, targets, input_lengths, target_lengths, backend="native")
    with pytest.raises(ValueError, match="backend must be one of"):
        ctc_loss(log_probs, targets, input_lengths, target_lengths, backend="cuda")


def test_a_failed_build_is_a_reason_not_an_exception(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RNNKIT_NO_NATIVE", raising=False)
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    broken = NativeExtension("rnnkit_test_broken", [source], extra_cflags=(), openmp=False,
                             isa=False)
    assert broken.load() is None
    assert broken.error is not None and broken.error.startswith(
        ("build failed:", "C++ compiler", "ninja not found"))
    assert broken.load() is None  # remembered: no second build


def test_impossible_alignment_is_a_clear_error_or_zero(backend) -> None:
    log_probs = torch.randn(4, 2, 3).log_softmax(2)
    targets = torch.tensor([[1, 1, 2], [1, 2, 1]])
    # sample 0 needs 4 frames (3 labels + 1 blank between the repeated 1s) but has 3
    input_lengths, target_lengths = torch.tensor([3, 4]), torch.tensor([3, 3])
    with pytest.raises(ValueError, match=r"sample 0: its input length is 3 frames but its 3 "
                                         r"labels need at least 4"):
        ctc_loss(log_probs, targets, input_lengths, target_lengths, backend=backend)
    leaf = log_probs.clone().requires_grad_()
    losses = ctc_loss(leaf, targets, input_lengths, target_lengths, reduction="none",
                      zero_infinity=True, backend=backend)
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


def test_double_backward_raises_not_zero(backend) -> None:
    """The gradient is made in the forward, so it is a constant to autograd: differentiating it
    again must raise (as for every hand-written backward), not give a silent zero."""
    torch.manual_seed(0)
    logits = torch.randn(12, 2, 5, dtype=torch.float64, requires_grad=True)
    targets, target_lengths = torch.tensor([[1, 2, 3], [4, 1, 0]]), torch.tensor([3, 2])
    loss = ctc_loss(logits.log_softmax(-1), targets, torch.tensor([12, 10]), target_lengths,
                    backend=backend)
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.pow(2).sum(), logits)
