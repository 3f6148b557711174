"""Inference at batch 1 (issue 15, item 4): the fused kernel's matrix-vector paths (``gemv_rows``,
eight weight rows at a time over W as stored; ``pack_gemv``'s packed weights, which the lean
path's ``forward_packed`` / ``step_packed`` read), the lean streaming ``step`` and the batch-1
routing of the plain
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

import rnnkit
from conftest import LAYER_FACTORIES as LAYERS
from conftest import TORCH_FORMS, VARIANTS, fused_optimizer_steps
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused, get_default_backend, set_default_backend

pytestmark = pytest.mark.skipif(fused.unavailable_reason(CellSpec("gru"), torch.float32, "cpu")
                                is not None, reason="the fused C++ kernels are unavailable")

INPUT, HIDDEN, STEPS = 19, 37, 11

# name -> constructor (input size, hidden size) of every variant's cell (the layers': LAYERS)
CELLS = {name: partial(cell, **options) for name, (_, cell, options) in VARIANTS.items()}
TORCH_CELLS = {
    "rnn_tanh": lambda i, h: nn.RNNCell(i, h),
    "rnn_relu": lambda i, h: nn.RNNCell(i, h, nonlinearity="relu"),
    "lstm": lambda i, h: nn.LSTMCell(i, h),
    "gru_after": lambda i, h: nn.GRUCell(i, h),
}


def _states(state: object) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def test_plain_lstm_at_batch_1_runs_rnnkit_kernel_in_inference_only(builtin_routes):
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
# H = 50: each gate's units pad to 56, a full 32-unit panel and a 24-unit one (three AVX2
# vectors, 18 real): the input projection's micro-kernel splits that panel into a two-vector and
# a one-vector block, the second with 2 real columns
@pytest.mark.parametrize("hidden", [HIDDEN, 50, 64])
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


# ---- the lean eager inference path (rnnkit.engine.fused.inference) ------------------------------


def _flat(result: tuple[torch.Tensor, object]) -> list[torch.Tensor]:
    return [result[0], *_states(result[1])]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (2, True)])
def test_lean_layer_path_equals_general_path_and_torch(name, layers, bidirectional):
    """Under inference_mode a layer at batch 1 runs the lean path (its plan is built); its
    results equal the general path's (grad enabled) and torch.nn's (torch's forms), with and
    without ``lengths``, from zero and from a given initial state."""
    torch.manual_seed(3)
    make = LAYERS[name]
    layer = type(make(1, 1))(INPUT, HIDDEN, num_layers=layers, bidirectional=bidirectional,
                             **_variant_kwargs(make(1, 1))).eval()
    x = torch.randn(STEPS, 1, INPUT)
    depth = layers * (2 if bidirectional else 1)
    hx = [torch.randn(depth, 1, HIDDEN) for _ in range(2 if "lstm" in name else 1)]
    hx = tuple(hx) if len(hx) == 2 else hx[0]
    for kwargs in ({}, {"lengths": [6]}, {"lengths": torch.tensor([STEPS])}, {"hx": hx}):
        layer.__dict__.pop("_inference_plan", None)
        with torch.inference_mode():
            lean = _flat(layer(x, **kwargs))
        assert "_inference_plan" in layer.__dict__, kwargs  # the lean path ran
        general = _flat(layer(x, **kwargs))  # (grad enabled: the general path)
        assert len(lean) == len(general)
        for got, want in zip(lean, general):  # (float32 rounding: the lean path's products
            # read W_hh packed (pack_gemv), summing in another order than the general path's)
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
        if name in TORCH_FORMS and "hx" not in kwargs:
            reference = layer.to_torch().eval()
            cut = kwargs.get("lengths", [STEPS])[0]
            with torch.inference_mode():
                packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([int(cut)]))
                out, state = reference(packed)
                out, _ = nn.utils.rnn.pad_packed_sequence(out, total_length=STEPS)
            for got, want in zip(lean, [out, *_states(state)]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _variant_kwargs(layer: nn.Module) -> dict[str, object]:
    """The constructor keywords that make ``layer``'s variant."""
    spec = layer.math.spec
    if spec.kind == "rnn":
        return {"nonlinearity": spec.nonlinearity}
    if spec.kind == "lstm":
        return {"peephole": spec.peephole, "coupled": spec.coupled}
    return {"reset": spec.reset}


@pytest.mark.parametrize("name", ["lstm_peephole", "gru_after"])
def test_lean_weight_cache_follows_in_place_changes(name):
    """The cached plan (contiguous weights, stacked peepholes) is rebuilt after an in-place
    weight change, an optimizer step and load_state_dict: results always equal the general
    path's on the current weights."""
    torch.manual_seed(4)
    layer = LAYERS[name](INPUT, HIDDEN).eval()
    other = LAYERS[name](INPUT, HIDDEN)
    x = torch.randn(STEPS, 1, INPUT)

    def check() -> None:
        with torch.inference_mode():
            lean = _flat(layer(x))
        # (the plan's packed W_hh is the current one: packed from the weights of this version)
        packed = layer.__dict__["_inference_plan"].gemv[(0, 1)]
        expect = torch.ops.rnnkit_fused.pack_gemv(layer.weight_hh_l0.detach(), 4 if "lstm" in name
                                                  else 3)
        assert torch.equal(packed, expect)
        for got, want in zip(lean, _flat(layer(x))):  # (float32 rounding: see above)
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)

    check()
    first = layer.__dict__["_inference_plan"]
    with torch.no_grad():
        for p in layer.parameters():  # (the peephole vectors too: their stacked copy is cached)
            p.mul_(1.5)
    check()
    assert layer.__dict__["_inference_plan"] is not first
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    _flat(layer(x))[0].sum().backward()
    optimizer.step()
    check()
    fused_optimizer_steps(layer, lambda: _flat(layer(x))[0].sum(), check)
    layer.load_state_dict(other.state_dict())
    check()
    with torch.inference_mode():
        plan = layer.__dict__["_inference_plan"]
        layer(x)
        assert layer.__dict__["_inference_plan"] is plan  # unchanged weights: reused
    assert "_inference_plan" not in layer.__getstate__()  # (never pickled)


@pytest.mark.parametrize("name", ["lstm", "lstm_peephole_coupled", "rnn_tanh", "gru_before"])
def test_lean_cell_step_cache_and_fallbacks(name):
    """The lean step follows in-place weight changes; bad input under inference_mode still gets
    the general path's one-line error; the reference backend is honoured."""
    torch.manual_seed(5)
    cell = CELLS[name](INPUT, HIDDEN)
    x = torch.randn(1, INPUT)
    state = cell.zero_state(1)
    with torch.inference_mode():
        cell(x, state)  # (builds the plan)
    with torch.no_grad():
        cell.weight_hh.mul_(-2.0)
        for _ in range(3):  # (several calls: the step alternates the order it reads weights in)
            got, got_state = cell(x, state)
    backend = get_default_backend()
    try:
        set_default_backend("reference")
        want, want_state = cell(x, state)
        with torch.inference_mode():  # another backend: the lean step steps aside
            assert torch.equal(cell(x, state)[0], want.detach())
    finally:
        set_default_backend(backend)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(_states(got_state), _states(want_state)):
        torch.testing.assert_close(g, w.detach(), rtol=1e-5, atol=1e-6)
    with torch.inference_mode(), pytest.raises(ValueError, match="x_t"):
        cell(torch.randn(1, INPUT + 1), state)
    with torch.inference_mode(), pytest.raises(ValueError, match="state"):
        cell(x, [torch.randn(1, HIDDEN + 1) for _ in _states(state)])


def test_lean_path_steps_aside_for_autograd_and_bad_input():
    layer = rnnkit.LSTM(INPUT, HIDDEN, peephole=True)
    x = torch.randn(STEPS, 1, INPUT)
    out, _ = layer(x)  # grad enabled: the general path, differentiable
    assert out.requires_grad and "_inference_plan" not in layer.__dict__
    with torch.inference_mode(), pytest.raises(ValueError, match="input"):
        layer(torch.randn(STEPS, 1, INPUT + 2))
    with torch.inference_mode(), pytest.raises(ValueError):
        layer(x, lengths=[STEPS + 3])


@pytest.mark.parametrize("name", ["lstm", "gru_after", "rnn_tanh"])
def test_batch_1_beyond_l2_matches_torch_nn(name):
    """H = 384: the step's weights (W_ih and W_hh, up to 4.5 MiB) are beyond L2, as in the
    benchmark; layer and streaming cell as torch.nn's, over several steps and calls so both of
    gemv_rows8's reading directions and both orders of the step's weight reads run."""
    torch.manual_seed(6)
    hidden = 384
    layer = LAYERS[name](INPUT, hidden).eval()
    reference = layer.to_torch().eval()
    x = torch.randn(4, 1, INPUT)
    with torch.inference_mode():
        got, want = _flat(layer(x)), _flat(reference(x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    cell = CELLS[name](hidden, hidden)
    torch_cell = TORCH_CELLS[name](hidden, hidden)
    torch_cell.load_state_dict(cell.state_dict())
    xs = torch.randn(3, 1, hidden)
    state0 = [torch.randn(1, hidden) for _ in _states(cell.zero_state(1))]
    with torch.inference_mode():
        outputs, state = _unroll(cell, xs, cell.math.make_state(state0))
        want_outputs, want_state = _torch_unroll(torch_cell, xs, state0)
    for g, w in zip([*outputs, *_states(state)], [*want_outputs, *want_state]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_lean_layer_path_batch_first_unbatched_and_float64():
    """The input layouts the lean path rearranges itself, and float64 (the operator's generic
    path): results as the general path's."""
    torch.manual_seed(7)
    for layer, x in (
        (rnnkit.GRU(INPUT, HIDDEN, batch_first=True, bidirectional=True), torch.randn(1, STEPS, INPUT)),
        (rnnkit.LSTM(INPUT, HIDDEN, num_layers=2), torch.randn(STEPS, INPUT)),
        (rnnkit.RNN(INPUT, HIDDEN, dtype=torch.float64), torch.randn(STEPS, 1, INPUT, dtype=torch.float64)),
        (rnnkit.LSTM(INPUT, HIDDEN, bias=False, peephole=True), torch.randn(STEPS, 3, INPUT)),
    ):
        layer.eval()
        with torch.inference_mode():
            lean = _flat(layer(x))
        assert "_inference_plan" in layer.__dict__
        for got, want in zip(lean, _flat(layer(x))):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)


# ---- weights packed for batch-1 products (pack_gemv, forward_packed, step_packed) ---------------


def _kernel_config(name: str):
    """The fused kernels' config of a conftest variant (its operator arguments)."""
    from rnnkit.engine.fused._function import KERNELS, spec_of

    return KERNELS[spec_of(LAYERS[name](1, 1).math)]


@pytest.mark.parametrize("name", ["lstm", "lstm_peephole", "lstm_coupled", "gru_after",
                                  "gru_before", "rnn_relu"])
@pytest.mark.parametrize("hidden,size,bias", [(37, 19, True), (70, 1, False), (16, 33, True)])
def test_packed_operators_equal_the_operators_on_weights_as_stored(name, hidden, size, bias):
    """forward_packed / step_packed with pack_gemv's copies against layer_forward / step on the
    same weights (sizes off the packing's blocks: H = 37 and 70 end in a partial vector and 70 a
    partial panel of four; K = 1 and odd K end the two-chain loop on one row; 13 steps are two
    blocks of six rows of the input projection and one left over); a packed copy of the wrong
    size is ignored (the weights as stored are read)."""
    torch.manual_seed(8)
    ops = torch.ops.rnnkit_fused
    layer = LAYERS[name](size, hidden, bias=bias)
    from rnnkit.engine.fused._function import peephole_weights

    cfg = _kernel_config(name)
    args = cfg.args()
    params = [None if p is None else p.detach() for p in layer.layer_params(0, 0)]
    w_ih, w_hh, b_ih, b_hh = params[:4]
    gates = w_hh.shape[0] // hidden
    pw = peephole_weights(cfg, params)
    lstm = "lstm" in name
    x = torch.randn(13, 1, size)
    h0 = torch.randn(1, hidden)
    c0 = torch.randn(1, hidden) if lstm else None
    packed_ih, packed_hh = ops.pack_gemv(w_ih, gates), ops.pack_gemv(w_hh, gates)
    width = packed_hh.numel() // (gates * hidden)  # (= padded units / H: K = H here)
    assert packed_hh.numel() % gates == 0 and width * gates * hidden <= packed_hh.numel()
    want = ops.layer_forward(*args, x, h0, c0, w_ih, w_hh, b_ih, b_hh, pw, None, None, None, [],
                             False, 1, False)[:3]
    for copy_ih, copy_hh in ((packed_ih, packed_hh), (packed_ih[:-1], packed_hh[:-1])):
        got = ops.forward_packed(*args, x, h0, c0, w_ih, w_hh, b_ih, b_hh, pw, copy_ih, copy_hh, 1)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    want = ops.step(*args, x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, pw, 1)
    for _ in range(2):  # (both orders of the step's weight reads)
        got = ops.step_packed(*args, x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, pw, packed_ih,
                              packed_hh, 1)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lstm", "gru_after", "rnn_tanh"])
def test_batch_1_layer_nan_and_inf_propagate_as_torch(name):
    """A NaN or an infinity in the input, a weight or a bias of a batch-1 layer (packed W_hh)
    reaches the same outputs as in torch.nn's layer."""
    torch.manual_seed(9)
    layer = LAYERS[name](INPUT, HIDDEN).eval()
    for where, value in (("x", float("nan")), ("x", float("inf")), ("weight_hh_l0", float("nan")),
                         ("weight_hh_l0", float("-inf")), ("bias_hh_l0", float("inf"))):
        x = torch.randn(STEPS, 1, INPUT)
        with torch.no_grad():
            if where == "x":
                x[2, 0, 3] = value
            else:
                getattr(layer, where).view(-1)[30] = value
        reference = layer.to_torch().eval()
        with torch.inference_mode():
            got, want = _flat(layer(x)), _flat(reference(x))
        for g, w in zip(got, want):
            assert torch.equal(g.isnan(), w.isnan()), (where, value)
            assert torch.equal(g.isinf(), w.isinf()), (where, value)
            finite = g.isfinite()
            torch.testing.assert_close(g[finite], w[finite], rtol=1e-5, atol=1e-6)
        layer.load_state_dict(LAYERS[name](INPUT, HIDDEN).state_dict())


def test_packed_forward_of_a_long_input_equals_layer_forward():
    """More gates than the per-thread scratch keeps (T * 4H > 2^20 floats): forward_packed's
    buffer is allocated for the call, results as layer_forward's."""
    torch.manual_seed(10)
    ops = torch.ops.rnnkit_fused
    hidden, steps = 16, (1 << 20) // 64 + 7
    layer = LAYERS["lstm"](1, hidden)
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in layer.layer_params(0, 0)[:4])
    x, h0, c0 = torch.randn(steps, 1, 1), torch.randn(1, hidden), torch.randn(1, hidden)
    args = _kernel_config("lstm").args()
    got = ops.forward_packed(*args, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None,
                             ops.pack_gemv(w_ih, 4), ops.pack_gemv(w_hh, 4), 1)
    want = ops.layer_forward(*args, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, None, None, [],
                             False, 1, False)[:3]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
