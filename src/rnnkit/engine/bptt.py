"""Backpropagation through time by hand: one autograd node for a whole layer.

Forward: the input projection of all steps is one GEMM; each step is the cell's recurrent GEMM
plus its pointwise gates. Backward: the cell's hand-derived step backward in reverse time, then
``dx``, ``dW_ih`` and ``dW_hh`` as one GEMM each over all steps (``T·B`` rows), instead of T small
ones. Only the pointwise math comes from the cell; time, lengths and weight gradients live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.cells.base import CellMath, State
from rnnkit.engine import regularise
from rnnkit.engine.regularise import StepMasks


def _forward(
    math: CellMath,
    x: Tensor,
    state0: Sequence[Tensor],
    params: Sequence[Tensor | None],
    batch_sizes: Sequence[int] | None,
    keep: bool,
    masks: StepMasks | None = None,
) -> tuple[Tensor, list[Tensor], list[Any], list[Tensor]]:
    """Runs the layer; with ``keep`` also returns the step caches and the recurrent inputs."""
    w_ih, w_hh, b_ih, b_hh, *diag = params
    steps, batch, inputs = x.shape
    hidden = w_hh.shape[1]  # the width of h (the projected width P with a projection)
    flat_x = x.reshape(steps * batch, inputs)
    if w_ih is None:  # x is already the input projection (see engine.run_layer)
        gx_all = flat_x if b_ih is None else flat_x + b_ih
    else:
        gx_all = (flat_x @ w_ih.t() if b_ih is None else torch.addmm(b_ih, flat_x, w_ih.t()))
    gx_all = gx_all.view(steps, batch, w_hh.shape[0])  # (T, B, G*H); -1 fails when B = 0
    outputs = x.new_zeros(steps, batch, hidden)
    groups = math.recurrent_row_groups(w_hh.shape[0] // math.num_gates)
    recurrent_inputs = [x.new_zeros(steps, batch, hidden) for _ in groups] if keep else []
    caches: list[Any] = []
    state = list(state0)
    for t in range(steps):
        active = batch if batch_sizes is None else batch_sizes[t]
        running = tuple(s[:active] for s in state)
        new, cache = regularise.step(math, gx_all[t, :active], running, w_hh, b_hh, diag, masks, t)
        if keep:
            caches.append(cache)
            for buffer, value in zip(recurrent_inputs, math.recurrent_inputs(cache)):
                buffer[t, :active] = value
        # New tensors, never in-place writes: the caches hold views of the previous state.
        state = [n if active == batch else torch.cat((n, s[active:])) for s, n in zip(state, new)]
        outputs[t, :active] = new[0]
    return outputs, state, caches, recurrent_inputs


class _LayerBPTT(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, math: CellMath, batch_sizes: Sequence[int] | None, num_states: int,
                masks: StepMasks | None, x: Tensor, *tensors: Tensor | None) -> tuple[Tensor, ...]:
        state0, params = tensors[:num_states], tensors[num_states:]
        outputs, state, caches, recurrent_inputs = _forward(
            math, x, state0, params, batch_sizes, keep=True, masks=masks
        )
        ctx.math, ctx.batch_sizes, ctx.num_states = math, batch_sizes, num_states
        ctx.state_sizes = [s.shape[1] for s in state0]
        ctx.masks = masks  # (the masks are constants: no gradient flows into them)
        ctx.caches = caches
        ctx.has_bias = params[2] is not None
        ctx.num_diag = len(params) - 4
        ctx.save_for_backward(x, params[0], params[1], *params[4:], *recurrent_inputs)
        # The caches (a ctx attribute) hold the last step's state; returning those very tensors
        # would make output -> grad_fn -> ctx -> output, a cycle the garbage collector cannot see
        # through, and every training step would leak its activations.
        return (outputs, *(s.clone() for s in state))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_outputs: Tensor, *d_final: Tensor | None) -> tuple[Tensor | None, ...]:
        math: CellMath = ctx.math
        x, w_ih, w_hh, *rest = ctx.saved_tensors
        diag, recurrent_inputs = rest[:ctx.num_diag], rest[ctx.num_diag:]
        steps, batch, inputs = x.shape
        hidden = w_hh.shape[1]
        rows = w_hh.shape[0]
        d_state = [  # (an LSTM with a projection has h and c of different widths)
            d.clone() if d is not None else x.new_zeros(batch, size)
            for d, size in zip(d_final, ctx.state_sizes)
        ]
        d_gx_all = x.new_zeros(steps, batch, rows)
        d_gh_all = d_gx_all if math.shares_preactivation_grad else x.new_zeros(steps, batch, rows)
        d_diag = [torch.zeros_like(w) for w in diag]
        for t in reversed(range(steps)):
            active = batch if ctx.batch_sizes is None else ctx.batch_sizes[t]
            incoming = [d_state[0][:active] + d_outputs[t, :active]]
            incoming += [d[:active] for d in d_state[1:]]
            d_gx, d_gh, d_previous, d_diag_t = regularise.step_backward(
                math, tuple(incoming), ctx.caches[t], w_hh, diag, ctx.masks, t
            )
            d_gx_all[t, :active] = d_gx
            if not math.shares_preactivation_grad:
                d_gh_all[t, :active] = d_gh
            for d, value in zip(d_state, d_previous):
                d[:active] = value
            for total, value in zip(d_diag, d_diag_t):
                total += value

        flat_d_gx = d_gx_all.view(steps * batch, rows)
        flat_d_gh = d_gh_all.view(steps * batch, rows)
        needs = ctx.needs_input_grad
        d_x = d_w_ih = None
        if w_ih is None:  # x was the input projection itself
            d_x = flat_d_gx.view(steps, batch, inputs) if needs[4] else None
        else:
            d_x = (flat_d_gx @ w_ih).view(steps, batch, inputs) if needs[4] else None
            d_w_ih = flat_d_gx.t() @ x.reshape(steps * batch, inputs)
        d_w_hh = torch.empty_like(w_hh)
        for group, inputs_g in zip(math.recurrent_row_groups(rows // math.num_gates),
                                   recurrent_inputs):
            d_w_hh[group] = flat_d_gh[:, group].t() @ inputs_g.view(steps * batch, hidden)
        d_b_ih = flat_d_gx.sum(0) if ctx.has_bias else None
        d_b_hh = flat_d_gh.sum(0) if ctx.has_bias else None
        return (None, None, None, None, d_x, *d_state, d_w_ih, d_w_hh, d_b_ih, d_b_hh, *d_diag)


def run_bptt(
    math: CellMath,
    x: Tensor,
    state0: State,
    params: Sequence[Tensor | None],
    batch_sizes: Sequence[int] | None,
    masks: StepMasks | None = None,
) -> tuple[Tensor, State]:
    """Runs ``math`` over x (T, B, I) as one autograd node with hand-derived BPTT (``masks``:
    recurrent dropout and zoneout, see :mod:`rnnkit.engine.regularise`)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *state0, *params)
    )
    if not needs_grad:  # inference: no caches, no autograd node
        with torch.no_grad():
            outputs, state, _, _ = _forward(math, x, state0, params, batch_sizes, keep=False,
                                            masks=masks)
        return outputs, tuple(state)
    outputs, *state = _LayerBPTT.apply(math, batch_sizes, len(state0), masks, x, *state0,
                                       *params)
    return outputs, tuple(state)
