"""Ragged batches on the lean inference path (issue 15/16): ``layer(x, lengths=...)`` at batch > 1
under inference_mode runs engine/fused/inference.py (rows sorted longest first as the general
path sorts them, one operator call per layer and direction over the first batch_sizes[t] rows,
the reverse direction within each row's length, rows unsorted), not the general path.

Pinned against the general path (grad enabled: rnnkit's autograd-capable forward), the reference
engine and torch.nn's packed path (``pack_padded_sequence``) for the variants torch.nn has.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from conftest import LAYER_FACTORIES as LAYERS
from conftest import TORCH_FORMS, VARIANTS
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused
from rnnkit.engine.fused import _function
from rnnkit.engine.fused import inference as lean_inference
from rnnkit.engine.lengths import batch_sizes_for, longest_first, sort_by_length

pytestmark = [
    pytest.mark.skipif(fused.unavailable_reason(CellSpec("gru"), torch.float32, "cpu") is not None,
                       reason="the fused C++ kernels are unavailable"),
    pytest.mark.usefixtures("rnnkit_kernel_only"),
]

INPUT, HIDDEN, STEPS, BATCH = 11, 13, 9, 7


@pytest.fixture
def lean_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each layer call took the lean path (its layer_forward returned a result)."""
    taken: list[bool] = []
    original = lean_inference.layer_forward

    def spy(*args: object) -> object:
        result = original(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(lean_inference, "layer_forward", spy)
    return taken


def _flat(result: tuple[torch.Tensor, object]) -> list[torch.Tensor]:
    state = result[1]
    return [result[0], *(state if isinstance(state, tuple) else (state,))]


def _nan_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x`` (T, B, I) with NaN past each row's length (none of it may reach a result)."""
    x = x.clone()
    for row, length in enumerate(lengths.tolist()):
        x[length:, row] = float("nan")
    return x


def _torch_packed(layer: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor,
                  hx: object) -> list[torch.Tensor]:
    """torch.nn's result for the same weights through pack_padded_sequence."""
    theirs = layer.to_torch().eval()
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.inference_mode():
        out, state = theirs(packed) if hx is None else theirs(packed, hx)
    out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    return _flat((out, state))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_ragged_batch_equals_general_path_reference_and_torch(
        name, layers, bidirectional, dtype, lean_calls):
    """Random lengths (ties, a 1, the longest not first), NaN in x's padding, from zero and from
    a given state, at 9 x 7 rows (packed weights) and 3 x 4 (weights as stored): the lean path
    runs, its outputs and final states equal the general path's and the reference engine's, the
    outputs' padding is exactly 0, and torch.nn's packed path agrees."""
    torch.manual_seed(3)
    layer = LAYERS[name](INPUT, HIDDEN, num_layers=layers, bidirectional=bidirectional)
    layer = layer.to(dtype).eval()
    depth = layers * (2 if bidirectional else 1)
    for steps, batch, lengths in ((STEPS, BATCH, [4, 9, 1, 4, 7, 9, 2]), (3, 4, [2, 1, 3, 1])):
        lengths = torch.tensor(lengths)
        x = _nan_padding(torch.randn(steps, batch, INPUT, dtype=dtype), lengths)
        states = [torch.randn(depth, batch, HIDDEN, dtype=dtype)
                  for _ in range(2 if "lstm" in name else 1)]
        for hx in (None, states[0] if len(states) == 1 else tuple(states)):
            layer.__dict__.pop(lean_inference._ATTRIBUTE, None)
            lean_calls.clear()
            with torch.inference_mode():
                lean = _flat(layer(x, hx, lengths=lengths))
            assert lean_calls == [True]
            if steps * batch >= lean_inference.PACKED_MIN_ROWS:
                assert len(layer.__dict__[lean_inference._ATTRIBUTE].packed) == depth
            general = [t.detach() for t in _flat(layer(x, hx, lengths=lengths))]
            layer.backend = "reference"
            with torch.inference_mode():
                reference = _flat(layer(x, hx, lengths=lengths))
            layer.backend = None
            for got, want, ref in zip(lean, general, reference):
                assert not got.isnan().any()
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
            for row, length in enumerate(lengths.tolist()):
                assert torch.equal(lean[0][length:, row], torch.zeros_like(lean[0][length:, row]))
            if name in TORCH_FORMS:
                theirs = _torch_packed(layer, x, lengths, hx)
                for got, want in zip(lean, theirs):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lstm_peephole", "gru_before", "rnn_tanh"])
def test_lean_ragged_batch_on_two_loop_threads(name, monkeypatch, lean_calls):
    """Two loop threads (the batch split of the time loop over the first batch_sizes[t] rows):
    the same results as one thread, batch_first and lengths as a list."""
    torch.manual_seed(4)
    layer = LAYERS[name](INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=True).eval()
    lengths = [5, 9, 9, 3, 1, 8, 6, 2, 9, 4, 7, 5]
    x = torch.randn(len(lengths), STEPS, INPUT)
    with torch.inference_mode():
        one = _flat(layer(x, lengths=lengths))
        monkeypatch.setattr(_function, "loop_threads", 2)
        two = _flat(layer(x, lengths=lengths))
    assert lean_calls == [True, True]
    for got, want in zip(two, one):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    general = [t.detach() for t in _flat(layer(x, lengths=lengths))]
    for got, want in zip(two, general):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_lengths_that_all_run_or_are_sorted_and_bad_lengths(lean_calls):
    """Every length T is the padded call (the same result as no lengths); lengths already
    longest first need no gathers and give the general path's result; a length 0 or past T, a
    float or a wrong count is left to the general path, which raises its error."""
    torch.manual_seed(5)
    layer = LAYERS["gru_after"](INPUT, HIDDEN, bidirectional=True).eval()
    x = torch.randn(STEPS, 4, INPUT)
    with torch.inference_mode():
        full = _flat(layer(x, lengths=[STEPS] * 4))
        padded = _flat(layer(x))
        ordered = _flat(layer(x, lengths=torch.tensor([9, 7, 7, 2])))
    assert lean_calls == [True, True, True]
    assert all(torch.equal(a, b) for a, b in zip(full, padded))
    general = _flat(layer(x, lengths=torch.tensor([9, 7, 7, 2])))
    for got, want in zip(ordered, general):
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    for bad, error in (([9, 0, 3, 2], "at least 1"), ([9, 10, 3, 2], "longer than"),
                       (torch.tensor([9.0, 3.0, 3.0, 2.0]), "integers"),
                       ([9, 3, 2], "3 entries")):
        lean_calls.clear()
        with torch.inference_mode(), pytest.raises((ValueError, TypeError), match=error):
            layer(x, lengths=bad)
        assert lean_calls == [False]


@pytest.mark.parametrize("name", ["lstm", "gru_before", "rnn_sigmoid"])
def test_batch_0_with_empty_lengths_is_the_general_paths_empty_result(name, lean_calls):
    # found by the session-16 NaN fuzzer: under no_grad the lean path's _ragged took min() of
    # the empty lengths and raised "min() arg is an empty sequence"; with gradients the layer
    # returns the empty batch
    layer = LAYERS[name](INPUT, HIDDEN, bidirectional=True).eval()
    x = torch.randn(STEPS, 0, INPUT)
    with torch.no_grad():
        lean = _flat(layer(x, lengths=[]))
    general = _flat(layer(x, lengths=[]))
    assert [t.shape for t in lean] == [t.shape for t in general]
    assert lean[0].shape == (STEPS, 0, 2 * HIDDEN)


def test_longest_first_is_sort_by_length_and_batch_sizes_for():
    """The lean path's order and batch sizes from Python ints are the general path's tensor
    forms (stable: ties keep their order, also from 17 rows on, where CPU sort is not)."""
    gen = torch.Generator().manual_seed(6)
    for batch, steps in ((1, 1), (5, 3), (40, 12), (200, 50)):
        lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
        order, batch_sizes = longest_first(lengths.tolist(), steps)
        sorted_lengths, want_order, _ = sort_by_length(lengths)
        assert order == want_order.tolist()
        want = batch_sizes_for(sorted_lengths, steps)
        assert batch_sizes == (want if want is not None else [batch] * steps)
