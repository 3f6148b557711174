"""The layer-normalised LSTM/GRU kernels (``csrc/layer_norm_rnn.cpp``) as torch operators.

Operators ``torch.ops.rnnkit_ln.layer_forward`` / ``layer_backward`` / ``matmul`` (their own
library, built on first use like the other kernels). They run the time loop from
``gx = LN(x W_ih^T)``, which the engine computes before any backend
(:func:`rnnkit.cells.layer_norm.normalized_input`); the step backward returns d(gx) and d(W_hh h)
per step and the layer-norm gain and bias gradients (summed in the loop, where each row's
normalised values are at hand); ``W_hh``'s and the peepholes' gradients are formed here as one
GEMM or reduction each over all T·B rows, as in ``bptt``.

Registered here once the library is loaded (:func:`register`), as ``_function`` does for the
other kernels: a fake kernel for each operator (``torch.compile`` / ``torch.export`` trace them
without running them), :func:`_backward` as the autograd formula of ``layer_forward`` (its saved
activations are outputs, not differentiated), and ``layer_forward_lengths`` /
``layer_backward_lengths``, the pair with the longest-first lengths tensor in place of
``int[] batch_sizes`` for a ragged batch in a traced graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.cells.base import CellSpec
from rnnkit.engine.fused._function import define_lengths_operator, eager_node
from rnnkit.engine.lengths import zero_padding
from rnnkit.native import NativeExtension, first_derivative_only, tracing

NAMESPACE = "rnnkit_ln"

EXTENSION = NativeExtension(
    "rnnkit_layer_norm",
    [Path(__file__).with_name("csrc") / "layer_norm_rnn.cpp"],
    extra_cflags=("-O3", "-fno-trapping-math", "-fno-math-errno"),
    wide_vectors=True,
    ops_namespace=NAMESPACE,
    on_load=lambda ops: register(ops),  # (defined below)
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
    """``dᵀ inputs`` (Q, P) for d (R, Q), inputs (R, P), P ≤ Q. The tiles form it as
    ``(inputsᵀ d)ᵀ``: the narrower inputs is the operand copied transposed (a copy of d would
    cost up to a fifth of the product); a (Q, P) view of the (P, Q) result."""
    if _tiled(inputs, d, inputs.shape[1], inputs.shape[0], d.shape[1]):
        return torch.ops.rnnkit_ln.matmul(inputs.t().contiguous(), d).t()
    return d.t() @ inputs


class _Projection(torch.autograd.Function):
    """``x W_ih^T`` over all T·B rows (the layer-normalised cells' input projection) with the
    three products of its forward and backward through :func:`_matmul`."""

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
    else torch's. In a traced graph torch's: the tiles are an eager-speed choice, and the
    compiler picks its own product."""
    if not tracing() and _tiled(x, w_ih, x.numel() // max(x.shape[-1], 1), x.shape[-1], w_ih.shape[0]):
        return _Projection.apply(x, w_ih)
    return x @ w_ih.t()


# rnnkit_ln::layer_forward's positional arguments, by name (for setup_context / backward)
(_GX, _H0, _C0, _WHH, _LN_W, _LN_B, _CELL_W, _CELL_B, _PEEP, _BATCH_SIZES, _TRAINING,
 _THREADS) = range(4, 16)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    y, _, _, acts, ahat, stats, cells = output
    ctx.variant = inputs[:4]
    ragged = inputs[_BATCH_SIZES]  # (layer_forward_lengths: a tensor, saved with the others)
    ctx.lengths = isinstance(ragged, Tensor)
    ctx.batch_sizes = None if ctx.lengths else list(ragged)
    ctx.training = inputs[_TRAINING]
    # the saved activations are outputs only so that backward can have them (see _function)
    ctx.mark_non_differentiable(acts, ahat, stats, cells)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[_H0], inputs[_C0], inputs[_WHH], inputs[_LN_W], inputs[_LN_B],
                          inputs[_CELL_W], inputs[_PEEP], y, acts, ahat, stats, cells,
                          ragged if ctx.lengths else None)


def _backward(ctx: Any, d_y: Tensor | None, d_h: Tensor | None, d_c: Tensor | None,
              *_: Tensor | None) -> tuple[Tensor | None, ...]:
    if not ctx.training:
        raise RuntimeError("rnnkit_ln::layer_forward ran with training=False: it saved nothing "
                           "to differentiate")
    (h0, c0, w_hh, ln_weight, ln_bias, cell_weight, peep, y, acts, ahat, stats, cells,
     lengths) = ctx.saved_tensors
    kind, peephole, coupled, before = ctx.variant
    lstm = kind == 1
    if d_y is None:  # only the final state was used: a zero gradient that takes no memory
        d_y = y.new_zeros(()).expand(y.shape)
    backward = (torch.ops.rnnkit_ln.layer_backward_lengths if ctx.lengths
                else torch.ops.rnnkit_ln.layer_backward)
    d_gx, d_a, dh0, dc0, g_ln, g_cell = backward(
        *ctx.variant, h0, c0, w_hh, ln_weight, ln_bias, cell_weight, peep,
        lengths if ctx.lengths else ctx.batch_sizes, y, acts, ahat, stats, cells, d_y, d_h,
        d_c if lstm else None, loop_threads)
    steps, batch, hidden = y.shape
    rows = steps * batch
    ragged = lengths if ctx.lengths else (ctx.batch_sizes or None)

    def previous(first: Tensor, seq: Tensor) -> Tensor:
        """(T, B, H) of the value at t − 1 (``first`` at t = 0), 0 for inactive rows."""
        return zero_padding(torch.cat((first.unsqueeze(0), seq[:-1])), ragged)

    h_prev = previous(h0, y)
    flat_da = d_a.view(rows, -1)
    if before:
        reset_h = acts[..., :hidden] * h_prev
        d_w_hh = torch.cat((flat_da[:, : 2 * hidden].t() @ h_prev.view(rows, hidden),
                            flat_da[:, 2 * hidden:].t() @ reset_h.view(rows, hidden)))
    else:
        d_w_hh = _weight_grad(flat_da, h_prev.view(rows, hidden))
    d_ln_weight, d_ln_bias = g_ln  # (summed over the steps in the kernel)
    d_cell_weight = d_cell_bias = d_peep = None
    if lstm:
        d_cell_weight, d_cell_bias = g_cell
        c = cells[..., :hidden]
        if peephole:
            c_prev = previous(c0, c)
            blocks = d_gx.split(hidden, dim=2)
            d_peep_rows = [(blocks[0] * c_prev).sum((0, 1))]
            if not coupled:
                d_peep_rows.append((blocks[1] * c_prev).sum((0, 1)))
            d_peep_rows.append((blocks[-1] * c).sum((0, 1)))
            d_peep = torch.stack(d_peep_rows)
    return (None, None, None, None, d_gx, dh0, dc0 if lstm else None, d_w_hh, d_ln_weight,
            d_ln_bias, d_cell_weight, d_cell_bias, d_peep, None, None, None)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _forward_fake(kind: int, peephole: bool, coupled: bool, before: bool, gx: Tensor,
                  h0: Tensor, c0: Tensor | None, w_hh: Tensor, ln_weight: Tensor,
                  ln_bias: Tensor, cell_weight: Tensor | None, cell_bias: Tensor | None,
                  peephole_weights: Tensor | None, batch_sizes: Any, training: bool,
                  threads: int) -> tuple[Tensor, ...]:
    steps, batch, gates = gx.shape
    hidden = h0.shape[1]
    lstm = kind == 1
    saved = training  # (without training the kernel saves nothing: empty tensors)
    return (
        gx.new_empty((steps, batch, hidden)),
        gx.new_empty((batch, hidden)),
        gx.new_empty((batch, hidden)) if lstm else _empty(gx),
        gx.new_empty((steps, batch, gates)) if saved else _empty(gx),
        gx.new_empty((steps, batch, gates)) if saved else _empty(gx),
        gx.new_empty((steps, batch, 2)) if saved else _empty(gx),
        gx.new_empty((steps, batch, 3 * hidden)) if saved and lstm else _empty(gx),
    )


def _backward_fake(kind: int, peephole: bool, coupled: bool, before: bool, h0: Tensor,
                   c0: Tensor | None, w_hh: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                   cell_weight: Tensor | None, peephole_weights: Tensor | None,
                   batch_sizes: Any, y: Tensor, acts: Tensor, ahat: Tensor, stats: Tensor,
                   cells: Tensor, grad_y: Tensor, grad_h_n: Tensor | None,
                   grad_c_n: Tensor | None, threads: int) -> tuple[Tensor, ...]:
    steps, batch, hidden = y.shape
    gates = ln_weight.shape[0]
    lstm = kind == 1
    return (
        y.new_empty((steps, batch, gates)),
        y.new_empty((steps, batch, gates)),
        y.new_empty((batch, hidden)),
        y.new_empty((batch, hidden)) if lstm else _empty(y),
        y.new_empty((2, gates)),
        y.new_empty((2, hidden)) if lstm else _empty(y),
    )


def _matmul_fake(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


_library: torch.library.Library | None = None
_eager_layer: type[torch.autograd.Function] | None = None  # (eager_node of layer_forward)


def register(ops: Any) -> None:
    """Fake kernels, autograd and the lengths-tensor pair; once, after the library is loaded."""
    global _library, _eager_layer
    _library = torch.library.Library(NAMESPACE, "FRAGMENT")  # (kept: it owns the definitions)
    _eager_layer = eager_node(ops.layer_forward.default, _setup_context, _backward)
    define_lengths_operator(_library, ops.layer_forward, "gx")
    define_lengths_operator(_library, ops.layer_backward, "y")
    for name, fake in (("layer_forward", _forward_fake), ("layer_backward", _backward_fake),
                       ("layer_forward_lengths", _forward_fake),
                       ("layer_backward_lengths", _backward_fake), ("matmul", _matmul_fake)):
        torch.library.register_fake(f"{NAMESPACE}::{name}")(fake)
    for forward in ("layer_forward", "layer_forward_lengths"):
        torch.library.register_autograd(f"{NAMESPACE}::{forward}", _backward,
                                        setup_context=_setup_context)
    for backward in ("layer_backward", "layer_backward_lengths"):
        first_derivative_only(
            f"{NAMESPACE}::{backward}",
            "the layer-normalised kernel's hand-derived backward is not twice differentiable (a "
            "double backward: create_graph=True differentiated again); backend='reference' runs "
            "plain torch ops that are")


def run(spec: CellSpec, gx: Tensor, state0: Sequence[Tensor], params: Sequence[Tensor | None],
        batch_sizes: Sequence[int] | Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer and direction from ``gx = LN(x W_ih^T)``; differentiable w.r.t. every input.

    ``params`` is the engine's ``(None, w_hh, None, None, ln_hh_weight, ln_hh_bias,
    [ln_cell_weight, ln_cell_bias,] *peepholes)`` (the input LN already applied).
    ``batch_sizes``: see :data:`rnnkit.engine.lengths.Ragged` (a tensor: a traced graph, which
    takes ``layer_forward_lengths``).
    """
    variant = KERNELS[spec]
    lstm = variant[0] == 1
    _, w_hh, _, _, ln_weight, ln_bias, *rest = params
    cell_weight, cell_bias, *peepholes = rest if lstm else (None, None)
    peep = torch.stack(tuple(peepholes)) if peepholes else None
    if isinstance(batch_sizes, Tensor):
        forward, ragged = torch.ops.rnnkit_ln.layer_forward_lengths, batch_sizes
    else:
        forward, ragged = torch.ops.rnnkit_ln.layer_forward, (
            [] if batch_sizes is None else [int(b) for b in batch_sizes])
        if ragged and all(b == gx.shape[1] for b in ragged):
            ragged = []
    c0 = state0[1] if lstm else None
    # Save activations only when a gradient will be asked for.
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (gx, *state0, w_hh, ln_weight, ln_bias, cell_weight, cell_bias, peep))
    if training and not tracing():  # (the same backward, without torch.library's call cost)
        forward = _eager_layer.apply
    y, h, c, *_ = forward(*variant, gx, state0[0], c0, w_hh, ln_weight, ln_bias, cell_weight,
                          cell_bias, peep, ragged, training, loop_threads)
    return y, ((h, c) if lstm else (h,))
