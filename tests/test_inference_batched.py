"""Batched inference (issue 15 item 4, batch >= 20 rows; issue 16 target 2's forward): the lean
path's packed weights (``pack_weights`` / ``layer_forward_packed``, kept in the module's plan)
and the one-thread GRU loops' single product per step (``pack_recurrent``'s panel layout).

Pinned against torch.nn (its forms) and rnnkit's reference engine (every variant). H = 70 puts
the gate blocks off the 128-column panels: an LSTM's 280 columns are two panels and a 24-column
tail, the reset-before GRU's r, z part (140) two panels and its n part (70) one.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from conftest import LAYER_FACTORIES as LAYERS
from conftest import TORCH_FORMS, VARIANTS, fused_optimizer_steps
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused
from rnnkit.engine.fused import _build, _function
from rnnkit.engine.fused import inference as lean_inference

pytestmark = [
    pytest.mark.skipif(fused.unavailable_reason(CellSpec("gru"), torch.float32, "cpu") is not None,
                       reason="the fused C++ kernels are unavailable"),
    pytest.mark.usefixtures("rnnkit_kernel_only"),
]

INPUT, HIDDEN, STEPS, BATCH = 19, 70, 9, 6


def _flat(result: tuple[torch.Tensor, object]) -> list[torch.Tensor]:
    state = result[1]
    return [result[0], *(state if isinstance(state, tuple) else (state,))]


def _operator_args(cfg: _function.Config, dtype: torch.dtype, batch_sizes: list[int],
                   threads: int) -> tuple[object, ...]:
    """layer_forward_packed's arguments without the packed weights, and those weights."""
    gen = torch.Generator().manual_seed(1)
    rows = {0: 1, 1: 3 if cfg.coupled else 4, 2: 3}[cfg.kind] * HIDDEN

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=dtype).sub(0.5)

    c0 = rand(BATCH, HIDDEN) if cfg.kind == 1 else None
    peep = rand(cfg.num_peephole, HIDDEN) if cfg.num_peephole else None
    return (*cfg.args(), rand(STEPS, BATCH, INPUT), rand(BATCH, HIDDEN), c0, rand(rows, INPUT),
            rand(rows, HIDDEN), rand(rows), rand(rows), peep), (batch_sizes, threads)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_operator_equals_layer_forward(name):
    """layer_forward_packed with pack_weights' copies is layer_forward exactly: float32 and
    float64, full and ragged batches, one loop thread (packed W_hh read) and two (not read)."""
    ops = _build.load()
    cfg = _function.config_of(LAYERS[name](2, 3).math)
    for dtype in (torch.float32, torch.float64):
        for batch_sizes in ([], [6, 6, 5, 5, 3, 3, 2, 1, 1]):
            for threads in (1, 2):
                args, (bs, nt) = _operator_args(cfg, dtype, batch_sizes, threads)
                w_ih_t, w_hh_packed = ops.pack_weights(*cfg.args(), args[8], args[9])
                got = ops.layer_forward_packed(*args, w_ih_t, w_hh_packed, bs, nt)
                want = ops.layer_forward(*args, None, None, None, bs, False, nt)[:3]
                for g, w in zip(got, want):
                    assert torch.equal(g, w), (dtype, batch_sizes, threads)


@pytest.mark.parametrize("name", ["lstm_peephole_coupled", "gru_before", "rnn_relu"])
def test_opcheck_packed_operators(name):
    ops = _build.load()
    cfg = _function.config_of(LAYERS[name](2, 3).math)
    args, (bs, nt) = _operator_args(cfg, torch.float64, [], 0)
    torch.library.opcheck(ops.pack_weights.default, (*cfg.args(), args[8], args[9]))
    w_ih_t, w_hh_packed = ops.pack_weights(*cfg.args(), args[8], args[9])
    torch.library.opcheck(ops.layer_forward_packed.default, (*args, w_ih_t, w_hh_packed, bs, nt))


def test_packed_operator_rejects_foreign_packing():
    ops = _build.load()
    cfg = _function.config_of(LAYERS["gru_after"](2, 3).math)
    args, (bs, nt) = _operator_args(cfg, torch.float32, [], 0)
    w_ih_t, w_hh_packed = ops.pack_weights(*cfg.args(), args[8], args[9])
    with pytest.raises(RuntimeError, match="w_ih_t"):
        ops.layer_forward_packed(*args, w_ih_t[:-1], w_hh_packed, bs, nt)
    with pytest.raises(RuntimeError, match="w_hh_packed"):
        ops.layer_forward_packed(*args, w_ih_t, w_hh_packed[:-1], bs, nt)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_lean_batched_path_equals_general_path_and_torch(name, layers, bidirectional):
    """Under inference_mode a batched layer runs the lean path with packed weights (kept in its
    plan); it equals the general path (grad enabled), the reference engine and torch.nn."""
    torch.manual_seed(5)
    layer = LAYERS[name](INPUT, HIDDEN, num_layers=layers, bidirectional=bidirectional).eval()
    x = torch.randn(STEPS, BATCH, INPUT)
    depth = layers * (2 if bidirectional else 1)
    hx = tuple(torch.randn(depth, BATCH, HIDDEN) for _ in range(2 if "lstm" in name else 1))
    for kwargs in ({}, {"hx": hx if len(hx) == 2 else hx[0]}):
        layer.__dict__.pop("_inference_plan", None)
        with torch.inference_mode():
            lean = _flat(layer(x, **kwargs))
        assert len(layer.__dict__["_inference_plan"].packed) == depth  # the packed path ran
        general = _flat(layer(x, **kwargs))
        layer.backend = "reference"
        reference = _flat(layer(x, **kwargs))
        layer.backend = None
        for got, want, ref in zip(lean, general, reference):
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
        if name in TORCH_FORMS:
            with torch.inference_mode():
                theirs = _flat(layer.to_torch().eval()(x, *kwargs.values()))
            for got, want in zip(lean, theirs):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _packed(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's one packed pair (one layer and direction)."""
    (packed,) = layer.__dict__["_inference_plan"].packed.values()
    return packed


@pytest.mark.parametrize("name", ["lstm_peephole", "gru_before", "rnn_tanh"])
def test_packed_weights_follow_a_change_of_gemm(name):
    """set_gemm (tests, benchmarks) changes the layout pack_weights makes (W_ih^T in 16-column
    panels and W_hh^T's panel width under rnnkit's own GEMM, one block / 128 columns under the
    others): a plan made before the switch packs again after it, and the outputs stay those of
    the general path. Before, the plan kept the old layout and the outputs were wrong."""
    ops = _build.load()
    first = ops.set_gemm("auto")
    others = [g for g in ("own", "blas", "brgemm") if g != first]
    torch.manual_seed(9)
    layer = LAYERS[name](INPUT, HIDDEN).eval()
    x = torch.randn(STEPS, BATCH, INPUT)
    try:
        for which in [first, *others, first]:
            if ops.set_gemm(which) != which:
                continue  # (not on this CPU or build)
            with torch.inference_mode():
                lean = _flat(layer(x))
            general = _flat(layer(x))  # (gradients on: layer_forward, no plan)
            for got, want in zip(lean, general):
                torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
            assert len(layer.__dict__["_inference_plan"].packed) == 1  # (the old copy dropped)
    finally:
        ops.set_gemm("auto")


@pytest.mark.parametrize("name", ["lstm_peephole", "gru_before"])
def test_packed_weights_follow_in_place_changes(name):
    """The plan's packed copies are rebuilt with it after an in-place change, a fused optimizer
    step and load_state_dict, and reused while the weights stay as they are."""
    torch.manual_seed(6)
    layer = LAYERS[name](INPUT, HIDDEN).eval()
    other = LAYERS[name](INPUT, HIDDEN)
    x = torch.randn(STEPS, BATCH, INPUT)

    def check() -> None:
        with torch.inference_mode():
            lean = _flat(layer(x))
        for got, want in zip(lean, _flat(layer(x))):
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)

    check()
    packed = _packed(layer)
    with torch.no_grad():
        layer.weight_hh_l0.mul_(1.5)
    check()
    assert _packed(layer) is not packed
    fused_optimizer_steps(layer, lambda: _flat(layer(x))[0].sum(), check)
    layer.load_state_dict(other.state_dict())
    check()
    packed = _packed(layer)
    check()
    assert _packed(layer) is packed


@pytest.mark.parametrize("name", list(VARIANTS))
def test_nan_and_inf_propagate_as_reference(name):
    """NaN and ±inf in the input, the initial state and a weight give the reference engine's
    (torch's ops) NaN pattern and values through the batched inference path (the GRU loops add
    the input part to the product in the pointwise pass now, not in the GEMM)."""
    torch.manual_seed(7)
    layer = LAYERS[name](INPUT, HIDDEN).eval()
    x = torch.randn(STEPS, BATCH, INPUT)
    x[2, 1, 3] = float("nan")
    x[4, 2, 0] = float("inf")
    x[5, 3, :] = -float("inf")
    h0 = torch.randn(1, BATCH, HIDDEN)
    h0[0, 4, 7] = float("inf")
    hx = (h0, torch.randn(1, BATCH, HIDDEN)) if "lstm" in name else h0
    with torch.no_grad():
        layer.weight_hh_l0[5, 2] = float("inf")
    with torch.inference_mode():
        lean = _flat(layer(x, hx))
        layer.backend = "reference"
        reference = _flat(layer(x, hx))
    for got, want in zip(lean, reference):
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    if name in TORCH_FORMS:
        with torch.inference_mode():
            theirs = _flat(layer.to_torch().eval()(x, hx))
        for got, want in zip(lean, theirs):
            assert torch.equal(got.isnan(), want.isnan())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_plain_lstm_inference_routing_by_steps(builtin_routes):
    """With one thread, inference over <= INFERENCE_OWN_MAX_STEPS steps runs rnnkit's kernel
    (torch's op pays a per-call weight reorder); longer sequences and training keep torch's op;
    the lean path runs it (its plan is built) and equals torch.nn."""
    assert fused.own_kernel_faster(35, 20, 200, threads=1, inference=True)
    assert fused.own_kernel_faster(50, 64, 512, threads=1, inference=True)
    assert not fused.own_kernel_faster(64, 32, 256, threads=1, inference=True)
    assert not fused.own_kernel_faster(35, 20, 200, threads=1)  # (a gradient: torch's op)
    assert not fused.own_kernel_faster(35, 20, 200, threads=2, inference=True)  # (not measured)
    fused.use_native = True  # (restored by the autouse fixture)
    torch.manual_seed(8)
    layer = LAYERS["lstm"](INPUT, HIDDEN).eval()
    x = torch.randn(STEPS, BATCH, INPUT)
    with torch.inference_mode():
        ours = _flat(layer(x))
        theirs = _flat(layer.to_torch().eval()(x))
    assert ("_inference_plan" in layer.__dict__) == (torch.get_num_threads() == 1)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: rnnkit.LSTM(8, 16), lambda: rnnkit.GRU(8, 16),
                                  lambda: rnnkit.RNN(8, 16, num_layers=2)])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_write_through_data_is_seen_by_the_next_inference(make, batch) -> None:
    """pytorch/examples' word_language_model trains with ``p.data.add_(p.grad, alpha=-lr)`` (no
    version bump, same storage) and evaluates under no_grad: the cached packed weights must not
    be the old ones (a review of session 10 measured differences of 1.3-2.0 before the fix)."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(10, batch, 8)
    with torch.no_grad():
        layer(x)  # builds the cached plan
        for p in layer.parameters():
            p.data.add_(torch.randn_like(p), alpha=0.5)
        lean = layer(x)[0]
    general = layer(x)[0].detach()  # grad mode: the general path reads the parameters
    torch.testing.assert_close(lean, general, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lstm_peephole", "gru_after"])
def test_calls_of_other_sizes_and_dtypes_one_after_another(name):
    """Inference reuses one gates buffer per thread from call to call (csrc/layer.h's
    gates_buffer): calls that need more of it, less of it and another dtype, one after another,
    each equal the general path, and an earlier call's outputs are not changed by a later one."""
    torch.manual_seed(10)
    layer = LAYERS[name](INPUT, HIDDEN).eval()
    shapes = [(STEPS, BATCH), (3 * STEPS, BATCH + 2), (2, BATCH), (STEPS, BATCH)]
    kept = []
    for dtype in (torch.float32, torch.float64, torch.float32):
        layer.to(dtype)
        for steps, batch in shapes:
            x = torch.randn(steps, batch, INPUT, dtype=dtype)
            with torch.inference_mode():
                lean = _flat(layer(x))
            general = [t.detach() for t in _flat(layer(x))]
            for got, want in zip(lean, general):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            kept.append((lean, [t.clone() for t in lean]))
    for lean, copy in kept:
        assert all(torch.equal(a, b) for a, b in zip(lean, copy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_plan_sees_a_write_of_one_sampled_element_of_any_parameter(dtype) -> None:
    """The plan's sample is compared by its bytes (NumPy views of the parameters): a write
    through ``.data`` of one sampled element (element 0) of any one parameter, peepholes
    included, rebuilds the plan, and calls without a write keep it (the same object)."""
    torch.manual_seed(1)
    layer = rnnkit.LSTM(8, 16, peephole=True).to(dtype)
    x = torch.randn(6, 3, 8, dtype=dtype)
    with torch.no_grad():
        layer(x)
        for name, p in layer.named_parameters():
            plan = layer.__dict__[lean_inference._ATTRIBUTE]
            layer(x)
            assert layer.__dict__[lean_inference._ATTRIBUTE] is plan, name
            p.data.view(-1)[0] += 1.0
            lean = layer(x)[0]
            assert layer.__dict__[lean_inference._ATTRIBUTE] is not plan, name
            with torch.enable_grad():  # (the general path reads the parameters)
                want = layer(x)[0].detach()
            torch.testing.assert_close(lean, want, rtol=1e-5, atol=1e-6)


def test_a_nan_weight_keeps_its_plan_and_propagates_as_the_general_path() -> None:
    """A NaN weight keeps its bits, so the byte-compared sample keeps the plan (torch.equal
    never held a NaN equal to itself: the plan was rebuilt on every call); the outputs are NaN
    where the general path's are."""
    torch.manual_seed(2)
    layer = rnnkit.GRU(8, 16)
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        layer.weight_hh_l0.view(-1)[0] = float("nan")  # (an in-place write: a new plan)
        layer(x)
        plan = layer.__dict__[lean_inference._ATTRIBUTE]
        lean = layer(x)[0]
        assert layer.__dict__[lean_inference._ATTRIBUTE] is plan
    want = layer(x)[0].detach()
    assert torch.equal(lean.isnan(), want.isnan()) and lean.isnan().any()
    torch.testing.assert_close(lean, want, rtol=1e-5, atol=1e-6, equal_nan=True)
