"""The C++ CTC decoder (decoding/csrc/ctc_decode.cpp) against the pure-Python reference decoder.

Identical n-best means: the same label sequences, in the same order, with the same start frames,
and scores within 1e-9 (the C++ repeats the reference's float64 arithmetic, so in practice they
are bit-identical; the issue asks for 1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import shared_file

from rnnkit.decoding import ctc
from rnnkit.decoding.ctc import (
    Hypothesis,
    decode_batch,
    greedy_decode,
    prefix_beam_search,
    prefix_beam_search_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _native() -> None:
    reason = ctc.native_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the native CTC decoder cannot be built here: {reason}")


def _assert_same(native: list[Hypothesis], reference: list[Hypothesis]) -> None:
    assert [h.labels for h in native] == [h.labels for h in reference]
    assert [h.timesteps for h in native] == [h.timesteps for h in reference]
    for got, want in zip(native, reference):
        for field in ("score", "log_prob"):
            a, b = getattr(got, field), getattr(want, field)
            assert a == b or abs(a - b) <= 1e-9, (field, a, b)


def _random_log_probs(steps: int, batch: int, classes: int, generator: torch.Generator,
                      ties: bool, impossible: float) -> torch.Tensor:
    """Log-softmax of random logits; ``ties`` rounds the logits (many equal scores),
    ``impossible`` is the share of entries set to -inf."""
    logits = torch.randn(steps, batch, classes, generator=generator)
    if ties:
        logits = logits.round()
    log_probs = logits.log_softmax(-1)
    mask = torch.rand(steps, batch, classes, generator=generator) < impossible
    return log_probs.masked_fill(mask, -math.inf)


@pytest.mark.parametrize("beam_width", [1, 2, 4, 16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("impossible", [0.0, 0.3])
def test_beam_search_nbest_is_the_reference_one(beam_width: int, ties: bool,
                                                impossible: float) -> None:
    generator = torch.Generator().manual_seed(beam_width * 7 + ties * 3 + int(impossible * 10))
    for steps, classes in ((0, 3), (1, 2), (7, 3), (25, 6), (40, 12)):
        batch = 3
        log_probs = _random_log_probs(steps, batch, classes, generator, ties, impossible)
        lengths = torch.randint(0, steps + 1, (batch,), generator=generator)
        lengths[0] = steps
        for beta, prune_below, threshold in ((0.0, None, None), (0.7, -2.5, None),
                                             (-1.5, None, 2.0), (0.0, -1.5, 0.0)):
            options = {"beam_width": beam_width, "beta": beta, "prune_below": prune_below,
                       "beam_threshold": threshold}
            native = prefix_beam_search_batch(log_probs, lengths, backend="native", **options)
            reference = prefix_beam_search_batch(log_probs, lengths, backend="python", **options)
            assert len(native) == batch
            for got, want in zip(native, reference):
                _assert_same(got, want)
            # the batch reference is the single-utterance reference on each utterance's frames
            for n in range(batch):
                alone = prefix_beam_search(log_probs[: int(lengths[n]), n], backend="python",
                                           **options)
                _assert_same(native[n], alone)


def test_two_threads_decode_what_one_thread_does() -> None:
    generator = torch.Generator().manual_seed(8)
    log_probs = _random_log_probs(30, 37, 6, generator, ties=True, impossible=0.1)
    lengths = torch.randint(0, 31, (37,), generator=generator)
    reference = prefix_beam_search_batch(log_probs, lengths, beam_width=5, backend="python")
    greedy = decode_batch(log_probs, lengths, backend="python")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native = prefix_beam_search_batch(log_probs, lengths, beam_width=5, backend="native")
        native_greedy = decode_batch(log_probs, lengths, backend="native")
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(native, reference):
        _assert_same(got, want)
    _assert_same(native_greedy, greedy)


def test_nbest_and_blank_other_than_zero() -> None:
    generator = torch.Generator().manual_seed(5)
    log_probs = _random_log_probs(30, 2, 5, generator, ties=True, impossible=0.1)
    for blank in (0, 2, 4):
        for nbest in (1, 3, None):
            options = {"beam_width": 6, "blank": blank, "nbest": nbest}
            native = prefix_beam_search_batch(log_probs, backend="native", **options)
            reference = prefix_beam_search_batch(log_probs, backend="python", **options)
            for got, want in zip(native, reference):
                assert len(got) == len(want) == min(nbest or 6, len(want))
                _assert_same(got, want)


def test_float64_float32_and_bfloat16_inputs_decode_alike() -> None:
    generator = torch.Generator().manual_seed(9)
    log_probs = _random_log_probs(20, 2, 7, generator, ties=False, impossible=0.0)
    for dtype in (torch.float64, torch.bfloat16):
        values = log_probs.to(dtype)
        native = prefix_beam_search_batch(values, beam_width=5, backend="native")
        reference = prefix_beam_search_batch(values, beam_width=5, backend="python")
        for got, want in zip(native, reference):
            _assert_same(got, want)


def test_greedy_is_the_reference_one_including_nan_and_ties() -> None:
    generator = torch.Generator().manual_seed(3)
    log_probs = _random_log_probs(30, 4, 5, generator, ties=True, impossible=0.2)
    log_probs[3, 1, 2] = math.nan  # greedy reads a NaN as torch.max does: the maximum
    log_probs[4, 1, :] = -math.inf  # all impossible: class 0, as torch.max picks
    log_probs[5, 2, 1] = math.inf
    lengths = torch.tensor([30, 12, 7, 0])
    native = decode_batch(log_probs, lengths, backend="native")
    reference = decode_batch(log_probs, lengths, backend="python")
    assert [h.labels for h in native] == [h.labels for h in reference]
    assert [h.timesteps for h in native] == [h.timesteps for h in reference]
    for got, want in zip(native, reference):
        assert got.score == pytest.approx(want.score, abs=1e-9, nan_ok=True)
    assert math.isnan(native[1].score) and native[3].labels == [] and native[3].score == 0.0
    one = greedy_decode(log_probs[:, 0], backend="native")
    assert one.labels == native[0].labels


def test_decode_batch_dispatches_beam_widths_to_the_native_search() -> None:
    generator = torch.Generator().manual_seed(11)
    log_probs = _random_log_probs(25, 3, 6, generator, ties=False, impossible=0.0)
    lengths = [25, 10, 3]
    native = decode_batch(log_probs, lengths, beam_width=8, backend="native")
    reference = decode_batch(log_probs, lengths, beam_width=8, backend="python")
    _assert_same(native, reference)


@pytest.mark.parametrize("backend", ["native", "python"])
def test_nan_or_plus_inf_in_beam_search_is_one_clear_error(backend: str) -> None:
    log_probs = torch.randn(6, 2, 4).log_softmax(-1)
    log_probs[4, 1, 3] = math.nan
    with pytest.raises(ValueError, match=r"log_probs\[4, 1, 3\] is nan: prefix beam search"):
        prefix_beam_search_batch(log_probs, beam_width=3, backend=backend)
    # past an utterance's length the frames are not read, so not checked
    prefix_beam_search_batch(log_probs, [6, 4], beam_width=3, backend=backend)
    log_probs[4, 1, 3] = math.inf
    with pytest.raises(ValueError, match=r"log_probs\[4, 0, 3\] is inf"):
        prefix_beam_search(log_probs[:, 1], beam_width=3, backend=backend)


def test_bad_arguments_are_named() -> None:
    log_probs = torch.randn(5, 2, 4).log_softmax(-1)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 6 is outside \[0, 5\]"):
        decode_batch(log_probs, [5, 6], beam_width=2)
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1 is outside"):
        decode_batch(log_probs, [-1, 2])
    with pytest.raises(ValueError, match="one entry per utterance"):
        decode_batch(log_probs, [5])
    with pytest.raises(TypeError, match="lengths must hold integers"):
        decode_batch(log_probs, torch.tensor([2.5, 3.0]))
    with pytest.raises(ValueError, match="blank index 4 is outside the 4 classes"):
        decode_batch(log_probs, blank=4, beam_width=3)
    with pytest.raises(ValueError, match="beam_width must be at least 1"):
        prefix_beam_search(log_probs[:, 0], beam_width=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_batch(log_probs, backend="gpu")
    with pytest.raises(ValueError, match="beam_threshold must be at least 0"):
        prefix_beam_search(log_probs[:, 0], beam_threshold=-1.0)
    with pytest.raises(ValueError, match="beta must be finite"):
        prefix_beam_search(log_probs[:, 0], beta=math.inf)
    with pytest.raises(ValueError, match=r"must be \(T, C\)"):
        greedy_decode(log_probs)


class _Bigram:
    def initial_state(self) -> int:
        return -1

    def score(self, state: int, label: int) -> tuple[float, int]:
        return (-0.1 if label == state + 1 else -2.0), label


def test_beam_threshold_drops_prefixes_far_below_the_best() -> None:
    generator = torch.Generator().manual_seed(4)
    log_probs = _random_log_probs(20, 1, 6, generator, ties=False, impossible=0.0)
    wide = prefix_beam_search(log_probs[:, 0], beam_width=50, backend="native")
    pruned = prefix_beam_search(log_probs[:, 0], beam_width=50, beam_threshold=1.0,
                                backend="native")
    assert len(pruned) < len(wide) == 50
    assert all(h.score >= pruned[0].score - 1.0 for h in pruned)
    _assert_same(pruned, prefix_beam_search(log_probs[:, 0], beam_width=50, beam_threshold=1.0,
                                            backend="python"))


def test_with_a_language_model_the_python_search_runs_and_native_is_refused() -> None:
    generator = torch.Generator().manual_seed(2)
    log_probs = _random_log_probs(12, 2, 5, generator, ties=False, impossible=0.0)
    options = {"beam_width": 4, "lm": _Bigram(), "alpha": 0.8, "beta": 0.5}
    fused = prefix_beam_search_batch(log_probs, **options)
    for n in range(2):
        _assert_same(fused[n], ctc._prefix_beam_search_reference(log_probs[:, n], **options))
    # the LM changes the ranking (else this test could not tell LM and no LM apart)
    assert fused[0][0].lm_log_prob != 0.0
    with pytest.raises(ValueError, match="takes no language model"):
        prefix_beam_search_batch(log_probs, backend="native", **options)


def test_an_untrained_speech_model_on_fsdd_recordings_decodes_identically() -> None:
    """Real acoustic-model outputs: a randomly initialised speech model over FSDD recordings."""
    from rnnkit.data.audio import FeatureConfig, FeatureExtractor
    from rnnkit.models.acoustic import AcousticConfig, AcousticModel

    directory = shared_file("fsdd/recordings")
    paths = sorted(directory.glob("*_george_*.wav"))[:6]
    extractor = FeatureExtractor(FeatureConfig())
    features = [extractor.from_file(path) for path in paths]
    torch.manual_seed(0)
    model = AcousticModel(AcousticConfig(features=features[0].shape[1])).eval()
    lengths = torch.tensor([f.shape[0] for f in features])
    with torch.no_grad():
        log_probs, out_lengths = model(torch.nn.utils.rnn.pad_sequence(features), lengths)
    for beam_width in (1, 8):
        native = prefix_beam_search_batch(log_probs, out_lengths, beam_width, backend="native")
        reference = prefix_beam_search_batch(log_probs, out_lengths, beam_width,
                                             backend="python")
        for got, want in zip(native, reference):
            _assert_same(got, want)


def test_without_the_kernel_auto_falls_back_to_python_with_one_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log_probs = torch.randn(8, 2, 4).log_softmax(-1)
    expected = decode_batch(log_probs, beam_width=3, backend="native")
    monkeypatch.setattr(ctc._EXTENSION, "load", lambda: None)
    monkeypatch.setattr(ctc._EXTENSION, "_error", "disabled by this test")
    monkeypatch.setattr(ctc._EXTENSION, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match=r"native CTC decoder is unavailable \(disabled by"):
        _assert_same(decode_batch(log_probs, beam_width=3), expected)
    with pytest.raises(RuntimeError, match="native CTC decoder is unavailable: disabled by"):
        decode_batch(log_probs, backend="native")
