"""The fused backward's memory behaviour, pinned without timing anything.

Issue 16, target 5: peak memory of forward+backward ≤ torch.nn's. The kernel's backward walks
time in chunks (its gate-gradient buffers are (chunk, B, G·H), not (T, B, G·H)), an Elman layer
saves no activations beside the outputs they equal, and no gradient is materialised for the
saved activations. Here: a chunked backward equals the one-chunk backward (chunk sizes that split
T unevenly, with lengths, both directions and the regularisers' masks), gradcheck through it,
and what the operator saves for backward, counted. benchmarks/memory.py measures the peaks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from conftest import VARIANTS
from rnnkit.engine import fused, run_layer
from rnnkit.engine.fused import _build, _function
from rnnkit.engine.regularise import StepMasks

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(_build.load() is None,
                       reason=f"fused kernels unavailable: {_build.error()}"),
]


def set_chunk(steps: int) -> int:
    return torch.ops.rnnkit_fused.set_backward_chunk(steps)


@pytest.fixture
def chunk() -> Iterator[None]:
    """Restores the automatic chunk size after a test that forces one."""
    previous = set_chunk(0)
    yield
    set_chunk(previous)


def _layer_run(variant: str, dtype: torch.dtype, lengths, regularised: bool, steps: int):
    layer_class, _, options = VARIANTS[variant]
    torch.manual_seed(3)
    extra = {"recurrent_dropout": 0.3, "zoneout": 0.25} if regularised else {}
    layer = layer_class(3, 5, bidirectional=True, backend="fused", **options, **extra).to(dtype)
    x = torch.randn(steps, 4, 3, dtype=dtype, requires_grad=True)
    torch.manual_seed(11)  # the masks' draws: the same in every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, state = layer(x, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum()
    loss = loss + sum((s * s).sum() for s in states)
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return [out.detach(), *(s.detach() for s in states), *grads]


def _dirty_freed_memory() -> None:
    """NaN in memory just freed, which the next small allocations are likely to get back: an
    output or gradient that is never written then reads NaN, not a lucky 0."""
    junk = [torch.full((size,), float("nan")) for size in (16, 64, 256, 1024, 4096) for _ in (0, 1)]
    del junk


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("regularised", [False, True], ids=["plain", "masks"])
@pytest.mark.parametrize("lengths", [None, [7, 3, 7, 1], [5, 3, 4, 1]],
                         ids=["full", "lengths", "all_short"])
def test_chunked_backward_equals_one_chunk(variant: str, lengths, regularised: bool,
                                           dtype: torch.dtype, chunk: None) -> None:
    """T = 7 in chunks of 3 (3 + 3 + 1) and of 2, against the whole sequence in one chunk.
    all_short: no row runs at steps 5 and 6, so the chunk the backward starts with has no row
    (its weight gradients were at::empty's memory, then added to: float32 under gemm_own)."""
    want = _layer_run(variant, dtype, lengths, regularised, 7)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                          "atol": 1e-6}
    for steps in (3, 2):
        set_chunk(steps)
        _dirty_freed_memory()
        got = _layer_run(variant, dtype, lengths, regularised, 7)
        set_chunk(0)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **tol)


def test_one_chunk_is_the_unchunked_backward_bit_for_bit(chunk: None) -> None:
    """A chunk as long as the sequence runs the same GEMMs as the automatic size at small T."""
    want = _layer_run("lstm_peephole", torch.float32, [7, 3, 7, 1], True, 7)
    set_chunk(7)
    got = _layer_run("lstm_peephole", torch.float32, [7, 3, 7, 1], True, 7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("masks", ["none", "both"])
@pytest.mark.parametrize("variant_name", ["rnn_tanh", "lstm_peephole", "lstm_coupled",
                                          "gru_after", "gru_before"])
def test_chunked_gradcheck(variant_name: str, masks: str, chunk: None) -> None:
    layer_class, _, options = VARIANTS[variant_name]
    layer = layer_class(2, 3, backend="fused", **options).double()
    math = layer.math
    params = tuple(p.detach().requires_grad_() for p in layer.layer_params(0, 0))
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
                   for _ in math.state_names)
    count = len(state0)
    step_masks = None
    if masks == "both":
        step_masks = StepMasks((torch.rand(3, 3) > 0.3).double() / 0.7,
                               tuple((torch.rand(5, 3, 3) < 0.4).double() for _ in range(count)))

    def run(x, *rest):
        outputs, final = run_layer(math, x, rest[:count], rest[count:], [3, 3, 2, 2, 1], "fused",
                                   step_masks)
        return (outputs, *final)

    set_chunk(2)  # 5 steps: chunks of 2, 2 and 1
    assert torch.autograd.gradcheck(run, (x, *state0, *params))


@pytest.mark.parametrize("name", ["gru_after", "lstm_peephole", "rnn_tanh"])
def test_only_the_final_state_used(name: str, chunk: None) -> None:
    """No gradient reaches the outputs (grad_y is None): a zero one, chunked, not materialised."""
    layer_class, _, options = VARIANTS[name]
    layer = layer_class(3, 4, backend="fused", **options).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    reference = layer_class(3, 4, backend="bptt", **options).double()
    reference.load_state_dict(layer.state_dict())
    set_chunk(4)
    grads = []
    for module in (layer, reference):
        _, state = module(x)
        h = state[0] if isinstance(state, tuple) else state
        grads.append(torch.autograd.grad(h.sum(), [x, *module.parameters()]))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_what_the_operator_saves(name: str) -> None:
    """Exactly the tensors backward reads: no Elman activations next to y, and the saved
    activations take no gradient (none is materialised for them in backward)."""
    layer_class, _, options = VARIANTS[name]
    layer = layer_class(3, 5, backend="fused", **options)
    params = layer.layer_params(0, 0)
    cfg = _function.config_of(layer.math)
    steps, batch, hidden = 6, 2, 5
    x = torch.randn(steps, batch, 3, requires_grad=True)
    state0 = tuple(torch.zeros(batch, hidden) for _ in range(cfg.num_states))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.ops.rnnkit_fused.layer_forward(
            *cfg.args(), x, state0[0], state0[1] if cfg.kind == 1 else None, *params[:4],
            _function.peephole_weights(cfg, params), None, None, None, [], True, 0)
    sequence = {t.data_ptr() for t in saved if t.dim() == 3}
    elements = sum(t.numel() for t in saved if t.dim() == 3)
    gates = 1 if cfg.kind == 0 else 3 if cfg.kind == 2 or cfg.coupled else 4
    # x, y, the activations (not for Elman: y is them), the LSTM's cells, the GRU's extra
    want = steps * batch * (3 + hidden + (0 if cfg.kind == 0 else gates * hidden + hidden))
    assert elements == want, (elements, want)
    assert len(sequence) == sum(1 for t in saved if t.dim() == 3)  # no tensor saved twice
    assert all(not t.requires_grad for t in out[3:])


def _gemm_available(which: str) -> bool:
    ops = torch.ops.rnnkit_fused
    saved = ops.set_gemm("auto")
    try:
        return ops.set_gemm(which) == which
    finally:
        ops.set_gemm(saved)


@pytest.mark.skipif(_build.load() is None or not _gemm_available("own")
                    or not _gemm_available("blas"),
                    reason="needs rnnkit's AVX2 GEMM and a BLAS")
@pytest.mark.parametrize("regularised", [False, True], ids=["plain", "masks"])
@pytest.mark.parametrize("lengths", [None, [70, 31, 70, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("name", ["rnn_tanh", "gru_after", "gru_before", "lstm",
                                  "lstm_peephole", "lstm_coupled", "lstm_peephole_coupled"])
def test_own_weight_gradients_equal_blas(name: str, lengths, regularised: bool, chunk: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward under gemm_own forms dW = dG^T Z over in-cache transposes of dG
    (own_weight_grads); under BLAS, X^T dG over transposed copies (pgemm_tout). T·B = 280
    rows: two K chunks of 256, one of which straddles h0 and y; chunks of 3 steps (t0 > 0)
    too; H = 5 (every 8 x 8 transpose block a remainder). The plain LSTM on rnnkit's kernel,
    not torch's op."""
    monkeypatch.setattr(fused, "use_native", False)
    ops = torch.ops.rnnkit_fused
    saved = ops.set_gemm("auto")
    try:
        for steps in (0, 3):
            set_chunk(steps)
            ops.set_gemm("own")
            own = _layer_run(name, torch.float32, lengths, regularised, 70)
            ops.set_gemm("blas")
            blas = _layer_run(name, torch.float32, lengths, regularised, 70)
            for got, want in zip(own, blas):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    finally:
        ops.set_gemm(saved)
        set_chunk(0)
