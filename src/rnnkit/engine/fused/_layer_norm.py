"""The layer-normalised LSTM/GRU kernels (``csrc/layer_norm_rnn.cpp``) as torch operators.

Operators ``torch.ops.rnnkit_ln.layer_forward`` / ``layer_backward`` / ``matmul`` (their own
library, built on first use like the other kernels). Every variant runs the time loop from the
raw projection ``x W_ih^T``, normalising each row inside the loop, where the row is in cache
(:func:`normalises_input`; the other backends apply
:func:`rnnkit.cells.layer_norm.normalized_input` beforehand). The step backward returns
d(x W_ih^T) (through the input LN) and d(W_hh h) per step,
and the layer-norm gain and bias and the peephole gradients (summed in the loop, where each
row's values are at hand); ``W_hh``'s gradient is formed here as one GEMM over the rows, as
in ``bptt``. A ragged batch runs packed (:func:`run`): the rows that run only, Σ lengths of
them, in torch's PackedSequence layout, so that x W_ih^T, dx, dW_ih and dW_hh cost in proportion
to the real steps and x's padding is never read.

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
from rnnkit.engine.fused._function import (
    define_lengths_operator,
    eager_node,
    layer_backwards_first_derivative_only,
)
from rnnkit.engine.lengths import packed_index, zero_padding
from rnnkit.native import NativeExtension, builtin_operator, tracing

NAMESPACE = "rnnkit_ln"

EXTENSION = NativeExtension(
    "rnnkit_layer_norm",
    [Path(__file__).with_name("csrc") / "layer_norm_rnn.cpp"],
    extra_cflags=("-O3", "-fno-trapping-math", "-fno-math-errno"),
    wide_vectors=True,
    ops_namespace=NAMESPACE,
    on_load=lambda ops: register(ops),  # (defined below)
)

# Per row and step the kernel keeps the recurrent LN's and (LSTM) the input LN's mean and
# 1/std (``kStats`` in layer_norm_rnn.cpp)
STATS = 4

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
    LN itself (F.layer_norm over all T·B rows beforehand, forward and backward, was two more
    passes over a (T, B, G·H) array in memory each way), so the engine must not apply it
    (``run`` gets the layer's input and all its parameters): every kernel of :data:`KERNELS`
    (the LSTM since session 11, the reset-after GRU since 12, the reset-before GRU since 13,
    whose backward applies it in its second pass over the rows, where d(gx_r) is formed)."""
    return spec in KERNELS


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
    """``dᵀ inputs`` (Q, P) for d (R, Q), inputs (R, P): a weight gradient over all R rows,
    through torch.mm, which reads d transposed in place. Not the tiles: with K = T·B deep and the
    narrow operand copied transposed for them, they were the slower ones at this shape (session
    11, 1 thread, loaded machine, min of 11: (3200, 2048)ᵀ (3200, 512) 124 ms in the tiles with
    the copy against 104 through torch.mm; (3200, 1024)ᵀ (3200, 256) 39.6 against 31.6)."""
    return d.t() @ inputs


class _Projection(torch.autograd.Function):
    """``x W_ih^T`` over all rows (the layer-normalised cells' input projection) with the
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
    else torch's. In a traced graph torch's: the tiles are an eager-speed choice, and the
    compiler picks its own product."""
    if not tracing() and _tiled(x, w_ih, x.numel() // max(x.shape[-1], 1), x.shape[-1], w_ih.shape[0]):
        return _Projection.apply(x, w_ih)
    return x @ w_ih.t()


# rnnkit_ln::layer_forward's positional arguments, by name (for setup_context / backward)
(_GX, _H0, _C0, _WHH, _LN_W, _LN_B, _CELL_W, _CELL_B, _PEEP, _IN_W, _IN_B, _BATCH_SIZES,
 _TRAINING, _THREADS) = range(4, 18)


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
    in_weight = inputs[_IN_W]  # (the LSTM: the kernel applies the input LN to gx itself)
    ctx.save_for_backward(inputs[_H0], inputs[_C0], inputs[_WHH], inputs[_LN_W], inputs[_LN_B],
                          inputs[_CELL_W], inputs[_PEEP], y, acts, ahat, stats, cells, in_weight,
                          inputs[_GX] if in_weight is not None else None,
                          ragged if ctx.lengths else None)


def _backward(ctx: Any, d_y: Tensor | None, d_h: Tensor | None, d_c: Tensor | None,
              *_: Tensor | None) -> tuple[Tensor | None, ...]:
    if not ctx.training:
        raise RuntimeError("rnnkit_ln::layer_forward ran with training=False: it saved nothing "
                           "to differentiate")
    (h0, c0, w_hh, ln_weight, ln_bias, cell_weight, peep, y, acts, ahat, stats, cells, in_weight,
     projection, lengths) = ctx.saved_tensors
    kind, peephole, _, before = ctx.variant
    lstm = kind == 1
    if d_y is None:  # only the final state was used: a zero gradient that takes no memory
        d_y = y.new_zeros(()).expand(y.shape)
    backward = (torch.ops.rnnkit_ln.layer_backward_lengths if ctx.lengths
                else torch.ops.rnnkit_ln.layer_backward)
    d_gx, d_a, dh0, dc0, g_ln, g_cell, g_in, d_peep = backward(
        *ctx.variant, h0, c0, w_hh, ln_weight, ln_bias, cell_weight, peep, in_weight,
        lengths if ctx.lengths else ctx.batch_sizes, y, acts, ahat, stats, cells, projection,
        d_y, d_h, d_c if lstm else None, loop_threads)
    steps, batch, hidden = y.shape
    if acts.dim() == 2:  # packed (Σ lengths rows, see run): h_{t−1} of the rows that ran only
        first = ctx.batch_sizes[0]  # (step 0's rows read h0; step t's rows y[t − 1] of the same b)
        index = packed_index(ctx.batch_sizes, batch)[first:] - batch
        h_prev = torch.cat((h0[:first], y.view(steps * batch, hidden).index_select(0, index)))
    else:  # (T, B, H) of h_{t−1}, 0 for the rows that have ended (their d_a is 0 too)
        ragged = lengths if ctx.lengths else (ctx.batch_sizes or None)
        h_prev = zero_padding(torch.cat((h0.unsqueeze(0), y[:-1])), ragged)
    rows = acts.shape[0] if acts.dim() == 2 else steps * batch
    h_prev = h_prev.reshape(rows, hidden)
    flat_da = d_a.view(rows, d_a.shape[-1])  # (not -1: a batch of 0 rows)
    if before:
        reset_h = acts.view(rows, acts.shape[-1])[:, :hidden] * h_prev  # (not -1: 0 rows)
        d_w_hh = torch.cat((flat_da[:, : 2 * hidden].t() @ h_prev,
                            flat_da[:, 2 * hidden:].t() @ reset_h))
    else:
        d_w_hh = _weight_grad(flat_da, h_prev)
    d_ln_weight, d_ln_bias = g_ln  # (summed over the steps in the kernel, as the rest below)
    d_cell_weight, d_cell_bias = g_cell if lstm else (None, None)
    d_in_weight, d_in_bias = g_in if in_weight is not None else (None, None)
    return (None, None, None, None, d_gx, dh0, dc0 if lstm else None, d_w_hh, d_ln_weight,
            d_ln_bias, d_cell_weight, d_cell_bias, d_peep if peephole else None, d_in_weight,
            d_in_bias, None, None, None)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _forward_fake(kind: int, peephole: bool, coupled: bool, before: bool, gx: Tensor,
                  h0: Tensor, c0: Tensor | None, w_hh: Tensor, ln_weight: Tensor,
                  ln_bias: Tensor, cell_weight: Tensor | None, cell_bias: Tensor | None,
                  peephole_weights: Tensor | None, ln_ih_weight: Tensor | None,
                  ln_ih_bias: Tensor | None, batch_sizes: Any, training: bool,
                  threads: int) -> tuple[Tensor, ...]:
    *rows, gates = gx.shape  # (T, B) padded, (Σ batch_sizes,) packed
    batch, hidden = h0.shape
    steps = gx.shape[0] if gx.dim() == 3 else len(batch_sizes)
    lstm = kind == 1
    saved = training  # (without training the kernel saves nothing: empty tensors)
    return (
        gx.new_empty((steps, batch, hidden)),
        gx.new_empty((batch, hidden)),
        gx.new_empty((batch, hidden)) if lstm else _empty(gx),
        gx.new_empty((*rows, gates)) if saved else _empty(gx),
        gx.new_empty((*rows, gates)) if saved else _empty(gx),
        gx.new_empty((*rows, STATS)) if saved else _empty(gx),
        gx.new_empty((*rows, 3 * hidden)) if saved and lstm else _empty(gx),
    )


def _backward_fake(kind: int, peephole: bool, coupled: bool, before: bool, h0: Tensor,
                   c0: Tensor | None, w_hh: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                   cell_weight: Tensor | None, peephole_weights: Tensor | None,
                   ln_ih_weight: Tensor | None, batch_sizes: Any, y: Tensor, acts: Tensor,
                   ahat: Tensor, stats: Tensor, cells: Tensor, projection: Tensor | None,
                   grad_y: Tensor, grad_h_n: Tensor | None, grad_c_n: Tensor | None,
                   threads: int) -> tuple[Tensor, ...]:
    batch, hidden = y.shape[1:]
    gates = ln_weight.shape[0]
    lstm = kind == 1
    rows = acts.shape[:-1]  # (T, B) padded, (Σ batch_sizes,) packed
    return (
        y.new_empty((*rows, gates)),
        y.new_empty((*rows, gates)),
        y.new_empty((batch, hidden)),
        y.new_empty((batch, hidden)) if lstm else _empty(y),
        y.new_empty((2, gates)),
        y.new_empty((2, hidden)) if lstm else _empty(y),
        y.new_empty((2, gates)) if ln_ih_weight is not None else _empty(y),
        y.new_empty((2 if coupled else 3, hidden)) if peephole else _empty(y),
    )


def _step_fake(kind: int, peephole: bool, coupled: bool, before: bool, x: Tensor, h: Tensor,
               c: Tensor | None, *_: Any) -> tuple[Tensor, Tensor]:
    return h.new_empty(h.shape), h.new_empty(h.shape) if kind == 1 else _empty(h)


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
                       ("layer_backward_lengths", _backward_fake), ("matmul", _matmul_fake),
                       ("step", _step_fake)):
        torch.library.register_fake(f"{NAMESPACE}::{name}")(fake)
    for forward in ("layer_forward", "layer_forward_lengths"):
        torch.library.register_autograd(f"{NAMESPACE}::{forward}", _backward,
                                        setup_context=_setup_context)
    layer_backwards_first_derivative_only(NAMESPACE, "layer-normalised kernel")


def run(spec: CellSpec, x: Tensor, state0: Sequence[Tensor], params: Sequence[Tensor | None],
        batch_sizes: Sequence[int] | Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer and direction; differentiable w.r.t. every input.

    Where :func:`normalises_input` (every variant): ``x`` is the layer's input and ``params``
    all the layer's ``(w_ih, w_hh, None, None, ln_ih_weight, ln_ih_bias, ln_hh_weight,
    ln_hh_bias, [ln_cell_weight, ln_cell_bias,] *peepholes)``. Also taken (a test compares the
    two): ``x = LN(x W_ih^T)`` and ``params`` the engine's ``(None, w_hh, None, None,
    ln_hh_weight, ln_hh_bias, *rest)`` (the input LN applied beforehand:
    :func:`rnnkit.cells.layer_norm.normalized_input`).
    ``batch_sizes``: see :data:`rnnkit.engine.lengths.Ragged` (a tensor: a traced graph, which
    takes ``layer_forward_lengths``).
    """
    variant = KERNELS[spec]
    lstm = variant[0] == 1
    batch = x.shape[1]
    if isinstance(batch_sizes, Tensor):  # a traced graph: padded (T, B) rows, the padding zeroed
        forward, ragged = torch.ops.rnnkit_ln.layer_forward_lengths, batch_sizes
        x = zero_padding(x, batch_sizes)  # (the products below and in _backward read every row)
    else:
        forward, ragged = torch.ops.rnnkit_ln.layer_forward, (
            [] if batch_sizes is None else [int(b) for b in batch_sizes])
        if ragged and all(b == batch for b in ragged):
            ragged = []
        if ragged:  # the rows that run only, packed (StepRows in layer_norm_rnn.cpp): every
            # product — x W_ih^T here, dx, dW_ih through autograd, dW_hh in _backward — runs
            # over Σ lengths rows, and x's padding is never read (its dx: exactly 0)
            x = x.flatten(0, 1).index_select(0, packed_index(ragged, batch))
    in_weight = in_bias = None
    if params[0] is not None:  # (the raw input: this kernel applies the input LN)
        w_ih, w_hh, b_ih, b_hh, in_weight, in_bias, *rest = params
        gx = project(x, w_ih)  # (T, B, G·H) or packed (Σ lengths, G·H), not normalised
        params = (None, w_hh, b_ih, b_hh, *rest)
    else:
        gx = x
    _, w_hh, _, _, ln_weight, ln_bias, *rest = params
    cell_weight, cell_bias, *peepholes = rest if lstm else (None, None)
    peep = torch.stack(tuple(peepholes)) if peepholes else None
    c0 = state0[1] if lstm else None
    # Save activations only when a gradient will be asked for.
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (gx, *state0, w_hh, ln_weight, ln_bias, cell_weight, cell_bias, peep, in_weight,
                  in_bias))
    if training and not tracing():  # (the same backward, without torch.library's call cost)
        forward = _eager_layer.apply
    y, h, c, *_ = forward(*variant, gx, state0[0], c0, w_hh, ln_weight, ln_bias, cell_weight,
                          cell_bias, peep, in_weight, in_bias, ragged, training, loop_threads)
    return y, ((h, c) if lstm else (h,))


def run_step(math: Any, x: Tensor, state: Sequence[Tensor],
             params: Sequence[Tensor | None]) -> tuple[Tensor, ...] | None:
    """One step (B, I) of a layer-normalised cell through ``rnnkit_ln::step``, without autograd
    (the caller checked nothing needs a gradient); None where it cannot run (no extension, dtype,
    device), so the caller takes the layer path.

    ``params`` is the cell's ``(w_ih, w_hh, None, None, ln_ih_weight, ln_ih_bias, ln_hh_weight,
    ln_hh_bias, [ln_cell_weight, ln_cell_bias,] *peepholes)``. The whole step — both products,
    the three layer norms and the gates — is one C++ call, against ~25 torch ops through the
    layer path; the variant is looked up once per math object (building its spec costs ~10 us).
    """
    variant = math.__dict__.get("_ln_step_variant")
    if variant is None:
        if load() is None:
            return None
        variant = math.__dict__["_ln_step_variant"] = KERNELS[math.spec]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or tracing():
        return None  # (traced: the layer path, whose operators have fake kernels)
    w_ih, w_hh, _, _, in_weight, in_bias, ln_weight, ln_bias, *rest = params
    if variant[0] == 1:
        cell_weight, cell_bias, *peepholes = rest
        c = state[1]
    else:
        cell_weight = cell_bias = c = None
        peepholes = []
    peep = torch.stack(peepholes) if peepholes else None
    step = builtin_operator("rnnkit_ln::step")
    h, c = step(*variant, x, state[0], c, w_ih, w_hh, in_weight, in_bias, ln_weight, ln_bias,
                cell_weight, cell_bias, peep, loop_threads)
    return (h, c) if variant[0] == 1 else (h,)

