"""Inference at batch 1 (issue 15, item 4): the fused kernel's matrix-vector path (``gemv_rows``,
eight weight rows at a time), the lean streaming ``step`` and the batch-1 routing of the plain
LSTM to rnnkit's own kernel, pinned against implementations written by someone else: torch.nn
(layers and cells) and onnxruntime (every variant, with and without ``lengths``).

Sizes are chosen off the kernels' blocks: H = 37 rows per gate block is four blocks of eight
rows and five left over; K = 37 and I = 19 end in a partial 16-float vector.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from conftest import VARIANTS
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused, get_default_backend, set_default_backend

pytestmark = pytest.mark.skipif(fused.unavailable_reason(CellSpec("gru"), torch.float32, "cpu")
                                is not None, reason="the fused C++ kernels are unavailable")

INPUT, HIDDEN, STEPS = 19, 37, 11

# name -> constructor (input size, hidden size) of every variant's layer and cell (conftest)
LAYERS = {name: partial(layer, **options) for name, (layer, _, options) in VARIANTS.items()}
CELLS = {name: partial(cell, **options) for name, (_, cell, options) in VARIANTS.items()}
TORCH_FORMS = ("rnn_tanh", "rnn_relu", "lstm", "gru_after")
TORCH_CELLS = {
    "rnn_tanh": lambda i, h: nn.RNNCell(i, h),
    "rnn_relu": lambda i, h: nn.RNNCell(i, h, nonlinearity="relu"),
    "lstm": lambda i, h: nn.LSTMCell(i, h),
    "gru_after": lambda i, h: nn.GRUCell(i, h),
}


def _states(state: object) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def test_plain_lstm_at_batch_1_runs_rnnkit_kernel_in_inference_only():
    x = torch.randn(100, 1, 256)
    with torch.inference_mode():
        assert fused.native_op(CellSpec("lstm"), x, 256) is None  # measured faster: own kernel
    with torch.no_grad():
        assert fused.native_op(CellSpec("lstm"), x, 256) is None
    # with a gradient the one-thread rule is unchanged (torch's op from 32 rows on)
    assert fused.own_kernel_faster(100, 1, 256, threads=1, inference=True)
    assert not fused.own_kernel_faster(100, 1, 256, threads=1)
    assert not fused.own_kernel_faster(100, 2, 256, threads=1, inference=True)


@pytest.mark.parametrize("name", TORCH_FORMS)
@pytest.mark.parametrize("hidden", [HIDDEN, 64])
def test_layer_at_batch_1_matches_torch_nn(name, hidden):
    torch.manual_seed(hidden)
    layer = LAYERS[name](INPUT, hidden).eval()
    reference = layer.to_torch().eval()
    x = torch.randn(STEPS, 1, INPUT)
    with torch.inference_mode():
        out, state = layer(x)
        want_out, want_state = reference(x)
        # lengths=: the final state at the length, zeros after it (torch: a packed sequence)
        cut = 6
        out_l, state_l = layer(x, lengths=[cut])
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([cut]))
        want_l, want_state_l = reference(packed)
        want_l, _ = nn.utils.rnn.pad_packed_sequence(want_l, total_length=STEPS)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(_states(state), _states(want_state)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_l, want_l, rtol=1e-5, atol=1e-6)
    assert torch.equal(out_l[cut:], torch.zeros_like(out_l[cut:]))
    for got, want in zip(_states(state_l), _states(want_state_l)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class EveryVariant(nn.Module):
    """Every variant on one input: one export checks them all."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make(INPUT, HIDDEN) for make in LAYERS.values())

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        results = []
        for layer in self.layers:
            output, state = layer(x, lengths=lengths)
            results += [output, *_states(state)]
        return results


def test_every_variant_at_batch_1_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[dev]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed")
    from rnnkit.export import export_onnx

    torch.manual_seed(0)
    model = EveryVariant().eval()
    path = export_onnx(model, (torch.randn(5, 2, INPUT),), tmp_path / "every.onnx",
                       kwargs={"lengths": torch.tensor([5, 3])})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    x = torch.randn(STEPS, 1, INPUT)
    for length in (STEPS, 6):  # the whole sequence (rnnkit: no lengths) and a shorter one
        lengths = torch.tensor([length])
        with torch.inference_mode():  # the batch-1 inference path under test
            if length == STEPS:
                want = [t for layer in model.layers for t in (
                    lambda out, state: [out, *_states(state)])(*layer(x))]
            else:
                want = model(x, lengths)
        feeds = {"x": x.numpy(), "lengths": lengths.numpy()}
        got = session.run(None, {name: feeds[name] for name in names})
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


def _unroll(cell: nn.Module, xs: torch.Tensor, state: object) -> tuple[list[torch.Tensor], object]:
    outputs = []
    for x_t in xs:
        out, state = cell(x_t, state)
        outputs.append(out)
    return outputs, state


@pytest.mark.parametrize("name", list(CELLS))
def test_streaming_step_at_batch_1_matches_reference(name):
    """The lean ``step`` (float32, batch 1, one thread) against the pure-torch reference engine
    (every variant) and, for torch's forms, torch.nn's cells — over several steps, from a
    nonzero state."""
    torch.manual_seed(1)
    cell = CELLS[name](INPUT, HIDDEN)
    xs = torch.randn(5, 1, INPUT)
    state0 = cell.math.make_state([torch.randn(1, HIDDEN) for _ in _states(cell.zero_state(1))])
    with torch.inference_mode():
        outputs, state = _unroll(cell, xs, state0)
    backend = get_default_backend()
    try:
        set_default_backend("reference")
        with torch.inference_mode():
            want_outputs, want_state = _unroll(cell, xs, state0)
    finally:
        set_default_backend(backend)
    for got, want in zip([*outputs, *_states(state)], [*want_outputs, *_states(want_state)]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if name in TORCH_CELLS:
        reference = TORCH_CELLS[name](INPUT, HIDDEN)
        reference.load_state_dict(cell.state_dict())
        with torch.inference_mode():
            want_outputs, want_state = _torch_unroll(reference, xs, list(state0))
        for got, want in zip([*outputs, *_states(state)], [*want_outputs, *want_state]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _torch_unroll(cell: nn.Module, xs: torch.Tensor, state: list[torch.Tensor]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A torch.nn cell over ``xs``: its outputs and final state (LSTM: h and c)."""
    outputs = []
    for x_t in xs:
        new = cell(x_t, tuple(state) if len(state) == 2 else state[0])
        state = list(new) if isinstance(new, tuple) else [new]
        outputs.append(state[0])
    return outputs, state


@pytest.mark.parametrize("name", list(TORCH_CELLS))
def test_streaming_step_nan_and_inf_propagate_as_torch(name):
    """A NaN or an infinity in x or in the state reaches the same outputs as in torch.nn."""
    torch.manual_seed(2)
    cell = CELLS[name](INPUT, HIDDEN)
    reference = TORCH_CELLS[name](INPUT, HIDDEN)
    reference.load_state_dict(cell.state_dict())
    for where, value in (("x", float("nan")), ("x", float("inf")), ("h", float("-inf"))):
        x = torch.randn(1, INPUT)
        state = [torch.randn(1, HIDDEN) for _ in _states(cell.zero_state(1))]
        if where == "x":
            x[0, 3] = value
        else:
            state[0][0, 5] = value
        with torch.inference_mode():
            got, _ = cell(x, cell.math.make_state(state))
            want = reference(x, tuple(state) if name == "lstm" else state[0])
            want = want[0] if name == "lstm" else want
        assert torch.equal(got.isnan(), want.isnan()), (where, value)
        assert torch.equal(got.isinf(), want.isinf()), (where, value)
        finite = got.isfinite()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)
