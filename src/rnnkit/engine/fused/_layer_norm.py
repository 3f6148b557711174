"""The layer-normalised LSTM/GRU kernels (``csrc/layer_norm_rnn.cpp``) as an autograd node.

Operators ``torch.ops.rnnkit_ln.layer_forward`` / ``layer_backward`` (their own library, built on
first use like the other kernels). The GRU's run the time loop from ``gx = LN(x W_ih^T)``
(:func:`rnnkit.cells.layer_norm.normalized_input`, as every other backend); the LSTM's from the
raw projection ``x W_ih^T``, normalising each row inside the loop, where the row is in cache
(:func:`normalises_input`). The step backward returns d(gx) (the LSTM: d(x W_ih^T)) and
d(W_hh h) per step, and the layer-norm gain and bias and the peephole gradients (summed in the
loop, where each row's values are at hand); ``W_hh``'s gradient is formed here as one GEMM over
all T·B rows, as in ``bptt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.cells.base import CellSpec
from rnnkit.engine.lengths import zero_padding
from rnnkit.native import NativeExtension

EXTENSION = NativeExtension(
    "rnnkit_layer_norm",
    [Path(__file__).with_name("csrc") / "layer_norm_rnn.cpp"],
    extra_cflags=("-O3", "-fno-trapping-math", "-fno-math-errno"),
    wide_vectors=True,
    ops_namespace="rnnkit_ln",
)

# Threads for the row split; 0 = torch's thread count. Tests set it to force several blocks.
loop_threads = 0

# The one table from layer-normalised variant to the kernel's (kind, peephole, coupled, before)
KERNELS: dict[CellSpec, tuple[int, bool, bool, bool]] = {
    CellSpec("lstm", layer_norm=True): (1, False, False, False),
    CellSpec("lstm", peephole=True, layer_norm=True): (1, True, False, False),
    CellSpec("lstm", coupled=True, layer_norm=True): (1, False, True, False),
    CellSpec("lstm", peephole=True, coupled=True, layer_norm=True): (1, True, True, False),
    CellSpec("gru", reset="after", layer_norm=True): (2, False, False, False),
    CellSpec("gru", reset="before", layer_norm=True): (2, False, False, True),
}


def normalises_input(spec: CellSpec) -> bool:
    """Whether the kernel of ``spec`` takes the raw projection ``x W_ih^T`` and applies the input
    LN itself (the LSTM: F.layer_norm over all T·B rows beforehand, forward and backward, was
    two more passes over a (T, B, 4H) array in memory each way), so the engine must not apply
    it (``run`` gets the layer's input and all its parameters)."""
    return KERNELS[spec][0] == 1


def load() -> Any:
    """``torch.ops.rnnkit_ln``, or None (then ``EXTENSION.error`` says why)."""
    return EXTENSION.load()


# Products of at least this many multiply-adds go through the brgemm tiles: 68 vs 78 ms for
# torch.mm's MKL at 3200 x 512 x 2048 (T,B,H = 50,64,512); at 35,20,200 (112 M) and 200,1,64
# (3 M) the layer's training step showed no difference beyond the noise (20.7 vs 20.9 ms, 1.63
# vs 1.69 ms; 1 thread, loaded core), so those keep torch's product and skip the copies.
BRGEMM_MIN_MACS = 2**28


def _tiled(a: Tensor, b: Tensor, rows: int, inner: int, cols: int) -> bool:
    """Whether the float32 product (rows, inner) x (inner, cols) of a and b takes the tiles."""
    return (a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"
            and rows * inner * cols >= BRGEMM_MIN_MACS and load() is not None)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``: large float32 CPU products through the kernel's brgemm tiles
    (``rnnkit_ln::matmul``, ~15 % faster than torch.mm's MKL on this CPU), torch.mm otherwise."""
    if _tiled(a, b, a.shape[0], a.shape[1], b.shape[1]):
        return torch.ops.rnnkit_ln.matmul(a, b)
    return a @ b


def _weight_grad(d: Tensor, inputs: Tensor) -> Tensor:
    """``dᵀ inputs`` (Q, P) for d (R, Q), inputs (R, P): a weight gradient over all R = T·B rows,
    through torch.mm, which reads d transposed in place. Not the tiles: with K = T·B deep and the
    narrow operand copied transposed for them, they were the slower ones at this shape (session
    11, 1 thread, loaded machine, min of 11: (3200, 2048)ᵀ (3200, 512) 124 ms in the tiles with
    the copy against 104 through torch.mm; (3200, 1024)ᵀ (3200, 256) 39.6 against 31.6)."""
    return d.t() @ inputs


class _Projection(torch.autograd.Function):
    """``x W_ih^T`` over all T·B rows (the layer-normalised cells' input projection) with the
    products x W_ih^T and d W_ih through :func:`_matmul` (the weight gradient:
    :func:`_weight_grad`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_ih: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(rows, w_ih)
        ctx.shape = x.shape
        return _matmul(rows, w_ih.t().contiguous()).view(*x.shape[:-1], w_ih.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        rows, w_ih = ctx.saved_tensors
        d_rows = d_out.reshape(-1, d_out.shape[-1]).contiguous()
        d_x = _matmul(d_rows, w_ih).view(ctx.shape) if ctx.needs_input_grad[0] else None
        d_w = _weight_grad(d_rows, rows) if ctx.needs_input_grad[1] else None
        return d_x, d_w


def project(x: Tensor, w_ih: Tensor) -> Tensor:
    """``x @ w_ih.t()`` (differentiable): :class:`_Projection` for large float32 CPU products,
    else torch's."""
    if _tiled(x, w_ih, x.numel() // max(x.shape[-1], 1), x.shape[-1], w_ih.shape[0]):
        return _Projection.apply(x, w_ih)
    return x @ w_ih.t()


class _LayerNormLayer(torch.autograd.Function):
    """The time loop from ``gx``: LN(x W_ih^T), or (``in_weight`` given) the raw projection
    x W_ih^T that the kernel normalises with ``in_weight``, ``in_bias``."""

    @staticmethod
    def forward(ctx: Any, variant: tuple[int, bool, bool, bool], batch_sizes: list[int],
                gx: Tensor, h0: Tensor, c0: Tensor | None, w_hh: Tensor, ln_weight: Tensor,
                ln_bias: Tensor, cell_weight: Tensor | None, cell_bias: Tensor | None,
                peep: Tensor | None, in_weight: Tensor | None, in_bias: Tensor | None
                ) -> tuple[Tensor, ...]:
        y, h, c, acts, ahat, stats, cells = torch.ops.rnnkit_ln.layer_forward(
            *variant, gx, h0, c0, w_hh, ln_weight, ln_bias, cell_weight, cell_bias, peep,
            in_weight, in_bias, batch_sizes, True, loop_threads)
        ctx.variant, ctx.batch_sizes = variant, batch_sizes
        ctx.save_for_backward(h0, c0, w_hh, ln_weight, ln_bias, cell_weight, peep, y, acts, ahat,
                              stats, cells, in_weight, gx if in_weight is not None else None)
        return (y, h, c) if variant[0] == 1 else (y, h)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_y: Tensor, d_h: Tensor | None, *d_rest: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
        (h0, c0, w_hh, ln_weight, ln_bias, cell_weight, peep, y, acts, ahat, stats, cells,
         in_weight, projection) = ctx.saved_tensors
        kind, peephole, _, before = ctx.variant
        lstm = kind == 1
        d_c = d_rest[0] if lstm else None
        d_gx, d_a, dh0, dc0, g_ln, g_cell, g_in, d_peep = torch.ops.rnnkit_ln.layer_backward(
            *ctx.variant, h0, c0, w_hh, ln_weight, ln_bias, cell_weight, peep, in_weight,
            ctx.batch_sizes, y, acts, ahat, stats, cells, projection, d_y, d_h, d_c,
            loop_threads)
        steps, batch, hidden = y.shape
        rows = steps * batch
        bs = ctx.batch_sizes or None

        def previous(first: Tensor, seq: Tensor) -> Tensor:
            """(T, B, H) of the value at t − 1 (``first`` at t = 0), 0 for inactive rows."""
            return zero_padding(torch.cat((first.unsqueeze(0), seq[:-1])), bs)

        flat_da = d_a.view(rows, -1)
        d_w_hh = torch.empty_like(w_hh)
        if before:
            h_prev = previous(h0, y)
            reset_h = acts[..., :hidden] * h_prev
            d_w_hh[: 2 * hidden] = flat_da[:, : 2 * hidden].t() @ h_prev.view(rows, hidden)
            d_w_hh[2 * hidden:] = flat_da[:, 2 * hidden:].t() @ reset_h.view(rows, hidden)
        else:
            d_w_hh = _weight_grad(flat_da, previous(h0, y).view(rows, hidden))
        d_ln_weight, d_ln_bias = g_ln  # (summed over the steps in the kernel)
        d_cell_weight, d_cell_bias = g_cell if lstm else (None, None)
        d_in_weight, d_in_bias = g_in if in_weight is not None else (None, None)
        return (None, None, d_gx, dh0, dc0 if lstm else None, d_w_hh, d_ln_weight, d_ln_bias,
                d_cell_weight, d_cell_bias, d_peep if peephole else None, d_in_weight,
                d_in_bias)


def run(spec: CellSpec, x: Tensor, state0: Sequence[Tensor], params: Sequence[Tensor | None],
        batch_sizes: Sequence[int] | Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer and direction; differentiable w.r.t. every input.

    Where :func:`normalises_input` (the LSTM): ``x`` is the layer's input and ``params`` all the
    layer's ``(w_ih, w_hh, None, None, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
    ln_cell_weight, ln_cell_bias, *peepholes)``. Otherwise ``x = LN(x W_ih^T)`` and ``params`` the
    engine's ``(None, w_hh, None, None, ln_hh_weight, ln_hh_bias, *rest)`` (the input LN already
    applied: :func:`rnnkit.cells.layer_norm.normalized_input`).
    """
    if isinstance(batch_sizes, Tensor):  # (rnnkit.engine.lengths.Ragged in a traced graph)
        raise ValueError("the layer-normalised kernels cannot be traced "
                         "(torch.compile / torch.export) yet; run the layer eagerly")
    variant = KERNELS[spec]
    lstm = variant[0] == 1
    in_weight = in_bias = None
    if params[0] is not None:  # (the raw input: this kernel applies the input LN)
        if not normalises_input(spec):
            raise ValueError(f"the {spec} kernel takes LN(x W_ih^T) and no w_ih")
        w_ih, w_hh, b_ih, b_hh, in_weight, in_bias, *rest = params
        gx = project(x, w_ih)  # (T, B, G·H), not normalised
        params = (None, w_hh, b_ih, b_hh, *rest)
    else:
        gx = x
    _, w_hh, _, _, ln_weight, ln_bias, *rest = params
    cell_weight, cell_bias, *peepholes = rest if lstm else (None, None)
    peep = torch.stack(tuple(peepholes)) if peepholes else None
    bs = [] if batch_sizes is None else [int(b) for b in batch_sizes]
    if bs and all(b == gx.shape[1] for b in bs):
        bs = []
    c0 = state0[1] if lstm else None
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (gx, *state0, w_hh, ln_weight, ln_bias, cell_weight, cell_bias, peep, in_weight,
                  in_bias))
    if not training:
        y, h, c, *_ = torch.ops.rnnkit_ln.layer_forward(
            *variant, gx, state0[0], c0, w_hh, ln_weight, ln_bias, cell_weight, cell_bias, peep,
            in_weight, in_bias, bs, False, loop_threads)
        return y, ((h, c) if lstm else (h,))
    y, *final = _LayerNormLayer.apply(variant, bs, gx, state0[0], c0, w_hh, ln_weight, ln_bias,
                                      cell_weight, cell_bias, peep, in_weight, in_bias)
    return y, tuple(final)
