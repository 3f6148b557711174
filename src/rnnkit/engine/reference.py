"""The oracle: a layer run step by step with plain torch ops, differentiated by autograd.

Slow and simple on purpose; every faster backend is tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rnnkit.cells.base import CellMath, State
from rnnkit.engine import regularise
from rnnkit.engine.lengths import Ragged
from rnnkit.engine.regularise import StepMasks


def run_reference(
    math: CellMath,
    x: Tensor,
    state0: State,
    params: Sequence[Tensor | None],
    batch_sizes: Ragged,
    masks: StepMasks | None = None,
) -> tuple[Tensor, State]:
    """Runs ``math`` over x (T, B, I) from ``state0``; rows past their length keep their state.

    ``batch_sizes``: :data:`rnnkit.engine.lengths.Ragged` — with the lengths tensor of a traced
    graph every step runs all rows and the rows past their length keep their state by a select.

    ``masks``: recurrent dropout and zoneout (:mod:`rnnkit.engine.regularise`), or None.
    """
    w_ih, w_hh, b_ih, b_hh, *diag = params
    steps, batch, _ = x.shape
    gx_all = x if w_ih is None else x @ w_ih.t()  # (T, B, G*H); None: x is the projection
    if b_ih is not None:
        gx_all = gx_all + b_ih
    state = tuple(state0)
    outputs = []
    if isinstance(batch_sizes, Tensor):  # a traced graph: the longest-first lengths themselves
        return _run_masked(math, gx_all, state, w_hh, b_hh, diag, batch_sizes, masks)
    for t in range(steps):
        active = batch if batch_sizes is None else batch_sizes[t]
        running = tuple(s[:active] for s in state)
        new, _ = regularise.step(math, gx_all[t, :active], running, w_hh, b_hh, diag, masks, t)
        state = tuple(torch.cat((n, s[active:])) for n, s in zip(new, state))
        padding = new[0].new_zeros(batch - active, new[0].shape[1])
        outputs.append(torch.cat((new[0], padding)))
    return torch.stack(outputs), state


def _run_masked(math: CellMath, gx_all: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
                diag: Sequence[Tensor], lengths: Tensor, masks: StepMasks | None
                ) -> tuple[Tensor, State]:
    """The loop of :func:`run_reference` for a lengths tensor, whose values a traced graph
    cannot read to slice the running rows: ``where``, not a blend, so a row past its length
    keeps its state exactly (an inf or NaN from the padding's step never reaches it)."""
    outputs = []
    zero = gx_all.new_zeros(())
    for t in range(gx_all.shape[0]):
        running = (t < lengths).to(gx_all.device).unsqueeze(1)  # (B, 1)
        new, _ = regularise.step(math, gx_all[t], state, w_hh, b_hh, diag, masks, t)
        state = tuple(torch.where(running, n, s) for n, s in zip(new, state))
        outputs.append(torch.where(running, new[0], zero))
    return torch.stack(outputs), state
