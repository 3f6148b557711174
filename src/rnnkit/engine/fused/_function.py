"""The fused kernels as torch operators: the dispatch table, fake kernels and autograd.

The C++ library (``csrc/fused_rnn.cpp``) defines three operators with ``TORCH_LIBRARY``:

* ``rnnkit_fused::layer_forward``: one layer in one direction, the whole time loop; with
  ``training=True`` it also returns the activations ``layer_backward`` needs;
* ``rnnkit_fused::layer_backward``: the hand-derived BPTT of ``layer_forward``;
* ``rnnkit_fused::step``: one streaming time step (B, I) -> (h, c), nothing saved;
* ``rnnkit_fused::pack_step`` / ``step_stream``: the batch-1 step over the cell's weights packed
  once into one tensor (four arguments per call: x, h, c and that tensor);
* ``rnnkit_fused::pack_weights`` / ``layer_forward_packed``: the inference forward with the
  weights' transposed and panel-packed copies made once and kept by the caller (the lean
  inference path's plan, :mod:`rnnkit.engine.fused.inference`).

Two more, defined here in Python on top of those two, for a ragged batch in a traced graph
(``torch.compile``, ``torch.export``), where the batch sizes (Python ints read from the lengths
tensor) cannot be known while the graph is built:

* ``rnnkit_fused::layer_forward_lengths`` / ``layer_backward_lengths``: ``layer_forward`` /
  ``layer_backward`` with the longest-first lengths tensor (B,) in place of ``int[]
  batch_sizes``; they derive the batch sizes when they run (:func:`_batch_sizes`), exactly as
  the eager layer does, and call the C++ operators. :func:`define_lengths_operator` makes
  both (and the layer-normalised kernels' pair, :mod:`._layer_norm`) from the C++ schema.

This module registers what torch's tools need besides the CPU kernels: a fake (shape-only)
kernel for each operator, so ``torch.compile`` / ``torch.export`` trace them without running
them, and ``layer_backward`` as the autograd formula of ``layer_forward``. Registered once,
right after the library is loaded (see ``_build``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch
from torch import Tensor

from rnnkit.cells.base import CellSpec
from rnnkit.native import first_derivative_only, tracing

NAMESPACE = "rnnkit_fused"

# The C++ kernels apply recurrent dropout and zoneout (the StepMasks of rnnkit.engine.regularise:
# ``recurrent_mask``, ``zoneout_h``, ``zoneout_c`` of layer_forward/layer_backward).
MASKS_IN_KERNEL = True

# Threads for the C++ time loop; 0 = automatic. Tests set it to force the multi-thread split.
loop_threads = 0


@dataclass(frozen=True)
class Config:
    """The variant arguments every operator takes first (the C++ ``Variant``)."""

    kind: int  # 0 rnn, 1 lstm, 2 gru
    act: int  # rnn: 0 tanh, 1 relu, 2 sigmoid, 3 identity
    peephole: bool
    coupled: bool
    before: bool  # gru: reset gate applied before the recurrent product

    @property
    def num_peephole(self) -> int:
        if self.kind != 1 or not self.peephole:
            return 0
        return 2 if self.coupled else 3

    @property
    def num_states(self) -> int:
        return 2 if self.kind == 1 else 1

    def args(self) -> tuple[int, int, bool, bool, bool]:
        return self.kind, self.act, self.peephole, self.coupled, self.before


# The one table from cell variant to kernel: every variant the C++ implements, and only those.
KERNELS: dict[CellSpec, Config] = {
    CellSpec("rnn", nonlinearity="tanh"): Config(0, 0, False, False, False),
    CellSpec("rnn", nonlinearity="relu"): Config(0, 1, False, False, False),
    CellSpec("rnn", nonlinearity="sigmoid"): Config(0, 2, False, False, False),
    CellSpec("rnn", nonlinearity="identity"): Config(0, 3, False, False, False),
    CellSpec("lstm"): Config(1, 0, False, False, False),
    CellSpec("lstm", peephole=True): Config(1, 0, True, False, False),
    CellSpec("lstm", coupled=True): Config(1, 0, False, True, False),
    CellSpec("lstm", peephole=True, coupled=True): Config(1, 0, True, True, False),
    CellSpec("gru", reset="after"): Config(2, 0, False, False, False),
    CellSpec("gru", reset="before"): Config(2, 0, False, False, True),
}


def spec_of(cell: Any) -> CellSpec:
    """The :class:`CellSpec` of a cell math object (its ``spec``), or of a spec-like dataclass."""
    if isinstance(cell, CellSpec):
        return cell
    spec = getattr(cell, "spec", None)
    if isinstance(spec, CellSpec):
        return spec
    if is_dataclass(cell) and not isinstance(cell, type):
        try:
            return CellSpec(**asdict(cell))
        except TypeError as exc:
            raise ValueError(f"not a cell spec: {cell!r} ({exc})") from None
    raise ValueError(f"not a cell spec: {cell!r}")


def config_of(cell: Any) -> Config:
    """The kernel for a cell; raises ValueError naming the variant if there is none."""
    spec = spec_of(cell)
    try:
        return KERNELS[spec]
    except KeyError:
        raise ValueError(f"no fused kernel for {spec}") from None


def peephole_weights(cfg: Config, params: Sequence[Tensor | None]) -> Tensor | None:
    """The peephole vectors stacked as one (P, H) tensor, or None."""
    if cfg.num_peephole == 0:
        return None
    extra = params[4:]
    if len(extra) != cfg.num_peephole:
        raise ValueError(f"expected {cfg.num_peephole} peephole vectors, got {len(extra)}")
    return torch.stack(tuple(extra))


def _check(cfg: Config, x: Tensor, state0: Sequence[Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (T, B, I), got shape {tuple(x.shape)}")
    if len(state0) != cfg.num_states:
        raise ValueError(f"expected {cfg.num_states} state tensors, got {len(state0)}")


def run(
    cfg: Config,
    batch_sizes: list[int] | Tensor | None,
    x: Tensor,
    state0: Sequence[Tensor],
    params: Sequence[Tensor | None],
    training: bool,
    masks: Any = None,
    bf16: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer and direction through ``layer_forward`` (differentiable when ``training``).

    ``batch_sizes``: the active rows per step, or — in a traced graph (torch.compile,
    torch.export), where its values cannot be read — the longest-first lengths tensor (B,),
    which ``layer_forward_lengths`` turns into batch sizes when the graph runs.

    ``bf16``: mixed precision (see :mod:`rnnkit.engine.fused.precision`): the kernel's GEMMs read
    bf16 copies of their inputs and write float32; every tensor in and out stays float32.
    """
    if masks is not None and masks.names() and not MASKS_IN_KERNEL:
        raise ValueError(f"no fused kernel for {', '.join(masks.names())}")
    _check(cfg, x, state0)
    w_ih, w_hh, b_ih, b_hh = params[:4]
    c0 = state0[1] if cfg.kind == 1 else None
    keep_h = keep_c = recurrent = None
    if masks is not None:
        recurrent = masks.recurrent
        if masks.zoneout is not None:
            keep_h = masks.zoneout[0]
            keep_c = masks.zoneout[1] if cfg.kind == 1 else None
    traced = isinstance(batch_sizes, Tensor)
    forward = (torch.ops.rnnkit_fused.layer_forward_lengths if traced
               else torch.ops.rnnkit_fused.layer_forward)
    if training and not traced and not tracing():  # (the same backward, without the call cost
        forward = _eager_forward.apply  # of torch.library's registered autograd: eager_node)
    y, h, c, *_ = forward(
        *cfg.args(), x, state0[0], c0, w_ih, w_hh, b_ih, b_hh, peephole_weights(cfg, params),
        recurrent, keep_h, keep_c, batch_sizes if traced else (batch_sizes or []), training,
        loop_threads, bf16,
    )
    return y, ((h, c) if cfg.kind == 1 else (h,))


# ---- the lengths-tensor operators ------------------------------------------------------------------


def _batch_sizes(lengths: Tensor, steps: int) -> list[int]:
    """The C++ operators' ``batch_sizes`` for longest-first ``lengths``: what the eager layer
    passes (``batch_sizes_for``; [] when every row runs every step)."""
    from rnnkit.engine.lengths import batch_sizes_for  # (engine.lengths imports nothing of ours)

    if lengths.dim() != 1 or lengths.is_floating_point():
        raise ValueError(f"lengths must be a 1-D integer tensor, got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if lengths.numel() and not bool((lengths[:-1] >= lengths[1:]).all()):
        raise ValueError("lengths must be sorted longest first (the layer sorts them)")
    return batch_sizes_for(lengths.cpu(), steps) or []


def layer_backwards_first_derivative_only(namespace: str, kernel: str) -> None:
    """``<namespace>::layer_backward`` and its lengths twin raise on a second differentiation
    (:func:`rnnkit.native.first_derivative_only`), naming ``kernel``."""
    for backward in ("layer_backward", "layer_backward_lengths"):
        first_derivative_only(
            f"{namespace}::{backward}",
            f"the {kernel}'s hand-derived backward is not twice differentiable (a double "
            "backward: create_graph=True differentiated again); backend='reference' runs "
            "plain torch ops that are")


def define_lengths_operator(library: torch.library.Library, operator: Any, steps_from: str
                            ) -> str:
    """Defines ``<name>_lengths`` in ``library``: the C++ ``operator`` (an OpOverloadPacket with
    an ``int[] batch_sizes`` argument) with the longest-first lengths tensor (B,) in its place,
    turned into batch sizes (:func:`_batch_sizes`) when the graph runs. The schema is the C++
    one with that one argument changed, so the two cannot drift apart; ``steps_from`` names the
    (T, B, ·) argument whose first dimension is the step count. Returns the new name."""
    schema = operator.default._schema
    names = [argument.name for argument in schema.arguments]
    ragged, steps = names.index("batch_sizes"), names.index(steps_from)
    name = schema.name.split("::", 1)[1] + "_lengths"
    signature = str(schema).split("(", 1)[1].replace("int[] batch_sizes", "Tensor lengths", 1)
    library.define(name + "(" + signature)

    def with_lengths(*args: Any) -> tuple[Tensor, ...]:
        args = list(args)
        args[ragged] = _batch_sizes(args[ragged], args[steps].shape[0])
        return tuple(operator(*args))

    library.impl(name, with_lengths, "CPU")
    return name


def eager_node(operator: Any, setup_context: Callable[..., None],
               backward: Callable[..., tuple[Tensor | None, ...]]) -> type[torch.autograd.Function]:
    """The autograd node of ``operator`` for eager calls: the ``setup_context`` and ``backward``
    registered with torch.library (which traced graphs use), without the registered kernel's
    per-call cost — torch's ``fill_defaults`` rebuilds the schema's argument list once per
    argument, ~0.1 ms per call at 16 arguments (1 thread), 8 % of a 100,1,64 layer's step."""

    def forward(ctx: Any, *inputs: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():  # (the C++ kernel itself)
            output = operator(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type("EagerNode", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


# ---- registrations (run once the library is loaded) ----------------------------------------------


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _forward_fake(kind: int, act: int, peephole: bool, coupled: bool, reset_before: bool,
                  x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None, b_hh: Tensor | None, peephole_weights: Tensor | None,
                  recurrent_mask: Tensor | None, zoneout_h: Tensor | None,
                  zoneout_c: Tensor | None, batch_sizes: list[int], training: bool, threads: int,
                  bf16: bool = False) -> tuple[Tensor, ...]:
    steps, batch, hidden = x.shape[0], x.shape[1], h0.shape[1]
    lstm, gru = kind == 1, kind == 2
    # extra: the GRU's saved products, or the LSTM's c~ before zoneout of the cell
    extra = gru or (lstm and zoneout_c is not None)
    state = x.new_empty((batch, hidden))
    return (
        x.new_empty((steps, batch, hidden)),
        state,
        x.new_empty((batch, hidden)) if lstm else _empty(x),
        # (an Elman layer without zoneout of h saves no activations: they equal y)
        x.new_empty((steps, batch, w_hh.shape[0])) if training and (kind != 0 or zoneout_h is not None)
        else _empty(x),
        x.new_empty((steps, batch, hidden)) if training and lstm else _empty(x),
        x.new_empty((steps, batch, hidden)) if training and extra else _empty(x),
    )


def _backward_fake(kind: int, act: int, peephole: bool, coupled: bool, reset_before: bool,
                   x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor,
                   peephole_weights: Tensor | None, recurrent_mask: Tensor | None,
                   zoneout_h: Tensor | None, zoneout_c: Tensor | None, has_bias: bool,
                   batch_sizes: list[int],
                   y: Tensor, acts: Tensor, cells: Tensor, extra: Tensor, grad_y: Tensor,
                   grad_h_n: Tensor | None, grad_c_n: Tensor | None, need_dx: bool, need_dw: bool,
                   threads: int, bf16: bool = False) -> tuple[Tensor, ...]:
    rows = w_hh.shape[0]
    bias = need_dw and has_bias
    return (
        torch.empty_like(x) if need_dx else _empty(x),
        torch.empty_like(h0),
        torch.empty_like(h0) if kind == 1 else _empty(x),
        torch.empty_like(w_ih) if need_dw else _empty(x),
        torch.empty_like(w_hh) if need_dw else _empty(x),
        x.new_empty((rows,)) if bias else _empty(x),
        x.new_empty((rows,)) if bias else _empty(x),
        torch.empty_like(peephole_weights) if peephole_weights is not None else _empty(x),
    )


def _step_fake(kind: int, act: int, peephole: bool, coupled: bool, reset_before: bool,
               x: Tensor, h: Tensor, c: Tensor | None, w_ih: Tensor, w_hh: Tensor,
               b_ih: Tensor | None, b_hh: Tensor | None, peephole_weights: Tensor | None,
               threads: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(h), (torch.empty_like(h) if kind == 1 else _empty(x))


def _step_stream_fake(x: Tensor, h: Tensor, c: Tensor | None, packed: Tensor
                      ) -> tuple[Tensor, Tensor]:
    return torch.empty_like(h), (torch.empty_like(c) if c is not None else _empty(x))


def _pack_fake(kind: int, act: int, peephole: bool, coupled: bool, reset_before: bool,
               w_ih: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
    # (W_hh packed for every kind, whichever GEMM the process runs: see pack_weights)
    return w_ih.new_empty((w_ih.shape[1], w_ih.shape[0])), torch.empty_like(w_hh)


def _forward_packed_fake(kind: int, act: int, peephole: bool, coupled: bool, reset_before: bool,
                         x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor,
                         b_ih: Tensor | None, b_hh: Tensor | None,
                         peephole_weights: Tensor | None, w_ih_t: Tensor, w_hh_packed: Tensor,
                         batch_sizes: list[int], threads: int) -> tuple[Tensor, Tensor, Tensor]:
    y, h, c, *_ = _forward_fake(kind, act, peephole, coupled, reset_before, x, h0, c0, w_ih, w_hh,
                                b_ih, b_hh, peephole_weights, None, None, None, batch_sizes,
                                False, threads)
    return y, h, c


# layer_forward's positional arguments, by name (for setup_context / backward)
(_X, _H0, _C0, _WIH, _WHH, _BIH, _BHH, _PEEP, _RMASK, _KEEP_H, _KEEP_C, _BATCH_SIZES, _TRAINING,
 _THREADS, _BF16) = range(5, 20)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    y, _, _, acts, cells, extra = output
    ctx.variant = inputs[:5]
    # (layer_forward_lengths: a tensor, which is saved with the others)
    ragged = inputs[_BATCH_SIZES]
    ctx.lengths = isinstance(ragged, Tensor)
    ctx.batch_sizes = None if ctx.lengths else ragged
    ctx.threads = inputs[_THREADS]
    ctx.training = inputs[_TRAINING]
    ctx.bf16 = len(inputs) > _BF16 and bool(inputs[_BF16])  # (a schema default may be left out)
    ctx.num_inputs = len(inputs)
    ctx.has_bias = inputs[_BIH] is not None
    # The saved activations are outputs only so that backward can have them: no gradient flows
    # into them, and none is materialised (zero-filled (T, B, G*H) tensors would double the peak
    # memory of the backward).
    ctx.mark_non_differentiable(acts, cells, extra)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[_X], inputs[_H0], inputs[_C0], inputs[_WIH], inputs[_WHH],
                          inputs[_PEEP], inputs[_RMASK], inputs[_KEEP_H], inputs[_KEEP_C], y, acts,
                          cells, extra, ragged if ctx.lengths else None)


def _backward(ctx: Any, grad_y: Tensor, grad_h: Tensor, grad_c: Tensor, *_: Tensor
              ) -> tuple[Tensor | None, ...]:
    if not ctx.training:
        raise RuntimeError("rnnkit_fused::layer_forward ran with training=False: it saved "
                           "nothing to differentiate")
    (x, h0, c0, w_ih, w_hh, peep, recurrent, keep_h, keep_c, y, acts, cells, extra,
     lengths) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dx = needs[_X]
    need_dw = any(needs[i] for i in (_WIH, _WHH, _BIH, _BHH, _PEEP))
    lstm = ctx.variant[0] == 1
    if grad_y is None:  # only the final state was used: a zero gradient that takes no memory
        grad_y = y.new_zeros(()).expand(y.shape)
    backward = (torch.ops.rnnkit_fused.layer_backward_lengths if ctx.lengths
                else torch.ops.rnnkit_fused.layer_backward)
    dx, dh0, dc0, dwih, dwhh, dbih, dbhh, dpeep = backward(
        *ctx.variant, x, h0, c0, w_ih, w_hh, peep, recurrent, keep_h, keep_c, ctx.has_bias,
        lengths if ctx.lengths else ctx.batch_sizes, y, acts, cells,
        extra, grad_y, grad_h, grad_c if lstm else None, need_dx, need_dw, ctx.threads, ctx.bf16,
    )
    bias = ctx.has_bias and need_dw
    grads = (
        None, None, None, None, None,
        dx if need_dx else None,
        dh0,
        dc0 if lstm else None,
        dwih if need_dw else None,
        dwhh if need_dw else None,
        dbih if bias else None,
        dbhh if bias else None,
        dpeep if peep is not None else None,
        None, None, None,  # the masks are constants
        None, None, None,
    )
    return grads + (None,) * (ctx.num_inputs - len(grads))  # (bf16, when it was passed)


_library: torch.library.Library | None = None
_eager_forward: Any = None  # (eager_node of layer_forward)


def register() -> None:
    """Fake kernels and autograd for the operators; called once after the library is loaded."""
    global _library, _eager_forward
    _library = torch.library.Library(NAMESPACE, "FRAGMENT")  # (kept: it owns the definitions)
    ops = getattr(torch.ops, NAMESPACE)
    _eager_forward = eager_node(ops.layer_forward.default, _setup_context, _backward)
    define_lengths_operator(_library, ops.layer_forward, "x")
    define_lengths_operator(_library, ops.layer_backward, "x")
    torch.library.register_fake(f"{NAMESPACE}::layer_forward_lengths")(_forward_fake)
    torch.library.register_fake(f"{NAMESPACE}::layer_backward_lengths")(_backward_fake)
    torch.library.register_autograd(f"{NAMESPACE}::layer_forward_lengths", _backward,
                                    setup_context=_setup_context)
    torch.library.register_fake(f"{NAMESPACE}::layer_forward")(_forward_fake)
    torch.library.register_fake(f"{NAMESPACE}::layer_backward")(_backward_fake)
    torch.library.register_fake(f"{NAMESPACE}::step")(_step_fake)
    torch.library.register_fake(f"{NAMESPACE}::step_stream")(_step_stream_fake)
    torch.library.register_fake(f"{NAMESPACE}::pack_weights")(_pack_fake)
    torch.library.register_fake(f"{NAMESPACE}::layer_forward_packed")(_forward_packed_fake)
    torch.library.register_autograd(f"{NAMESPACE}::layer_forward", _backward,
                                    setup_context=_setup_context)
    layer_backwards_first_derivative_only(NAMESPACE, "fused kernel")
