r"""Gated recurrent unit, in both of its published forms.

Gate blocks are stacked in ``torch.nn.GRU``'s order r, z, n::

    gx = W_ih x_t + b_ih                          (all three blocks)
    r_t = σ(gx_r + W_hr h_{t-1} + b_hr)           # reset gate
    z_t = σ(gx_z + W_hz h_{t-1} + b_hz)           # update gate
    reset="after"  (torch / cuDNN):  n_t = tanh(gx_n + r_t ⊙ (W_hn h_{t-1} + b_hn))
    reset="before" (Cho et al. 2014): n_t = tanh(gx_n + W_hn (r_t ⊙ h_{t-1}) + b_hn)
    h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}

"after" lets all three recurrent blocks share one GEMM per step; "before" needs a second GEMM once
r_t is known, which is why cuDNN chose the other form.

Example::

    >>> import torch, rnnkit
    >>> cell = rnnkit.GRUCell(4, 8, reset="before")
    >>> output, (h,) = cell(torch.randn(2, 4))
    >>> output.shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rnnkit.cells.base import (
    CellMath,
    CellSpec,
    RecurrentCell,
    State,
    recurrent_input,
    recurrent_projection,
    sigmoid_grad,
    tanh_grad,
)

RESET_FORMS = ("after", "before")


class _GRUCache(NamedTuple):
    h_prev: Tensor
    r: Tensor
    z: Tensor
    n: Tensor
    # reset="after": W_hn h + b_hn (needed for dr); reset="before": r ⊙ h (the n block's input)
    n_recurrent: Tensor
    h_in: Tensor  # what W_hh multiplied: h_{t-1}, or h_{t-1} ⊙ m under recurrent dropout
    mask: Tensor | None = None  # recurrent dropout's mask


class GRUMath(CellMath):
    kind = "gru"
    num_gates = 3
    shares_preactivation_grad = False
    chrono_gates = ((1, 1.0),)  # z keeps h_{t-1}: b_z = log u (Tallec & Ollivier 2018)

    def __init__(self, reset: str = "after") -> None:
        if reset not in RESET_FORMS:
            raise ValueError(f"reset must be one of {RESET_FORMS}, got {reset!r}")
        self.reset = reset

    @property
    def spec(self) -> CellSpec:
        return CellSpec("gru", reset=self.reset)

    def step(
        self, gx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None, diag: Sequence[Tensor],
        recurrent_mask: Tensor | None = None,
    ) -> tuple[State, _GRUCache]:
        (h_prev,) = state
        # recurrent dropout reaches the gates' products only; the blend below keeps h_{t-1}
        h_in = recurrent_input(h_prev, recurrent_mask)
        hidden = h_prev.shape[1]
        gx_r, gx_z, gx_n = gx.chunk(3, dim=1)
        if self.reset == "after":
            gh_r, gh_z, gh_n = recurrent_projection(h_in, w_hh, b_hh).chunk(3, dim=1)
        else:
            rz_rows = slice(0, 2 * hidden)
            b_rz = None if b_hh is None else b_hh[rz_rows]
            gh_r, gh_z = recurrent_projection(h_in, w_hh[rz_rows], b_rz).chunk(2, dim=1)
        r = torch.sigmoid(gx_r + gh_r)
        z = torch.sigmoid(gx_z + gh_z)
        if self.reset == "after":
            n = torch.tanh(gx_n + r * gh_n)
            n_recurrent = gh_n
        else:
            n_rows = slice(2 * hidden, 3 * hidden)
            n_recurrent = r * h_in
            b_n = None if b_hh is None else b_hh[n_rows]
            n = torch.tanh(gx_n + recurrent_projection(n_recurrent, w_hh[n_rows], b_n))
        h = (1 - z) * n + z * h_prev
        return (h,), _GRUCache(h_prev, r, z, n, n_recurrent, h_in, recurrent_mask)

    def step_backward(
        self, d_state: State, cache: _GRUCache, w_hh: Tensor, diag: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, State, tuple[Tensor, ...]]:
        (dh,) = d_state
        h_prev, r, z, n, n_recurrent, h_in, mask = cache
        hidden = h_prev.shape[1]
        d_pre_n = dh * (1 - z) * tanh_grad(n)
        # dh h_prev - dh n, the two products autograd forms: dh (h_prev - n) would give an
        # infinity where an infinite dh meets h_prev = 0 and torch gives NaN
        d_pre_z = (dh * h_prev - dh * n) * sigmoid_grad(z)
        if self.reset == "after":
            d_pre_r = d_pre_n * n_recurrent * sigmoid_grad(r)
            d_gh = torch.cat((d_pre_r, d_pre_z, d_pre_n * r), dim=1)
            d_h_in = d_gh @ w_hh
        else:
            d_reset_h = d_pre_n @ w_hh[2 * hidden :]
            d_pre_r = d_reset_h * h_in * sigmoid_grad(r)
            d_gh = torch.cat((d_pre_r, d_pre_z, d_pre_n), dim=1)
            d_h_in = d_reset_h * r + d_gh[:, : 2 * hidden] @ w_hh[: 2 * hidden]
        dh_prev = dh * z + recurrent_input(d_h_in, mask)
        d_gx = torch.cat((d_pre_r, d_pre_z, d_pre_n), dim=1)
        return d_gx, d_gh, (dh_prev,), ()

    def recurrent_row_groups(self, hidden_size: int) -> list[slice]:
        if self.reset == "after":
            return [slice(0, 3 * hidden_size)]
        return [slice(0, 2 * hidden_size), slice(2 * hidden_size, 3 * hidden_size)]

    def recurrent_inputs(self, cache: _GRUCache) -> tuple[Tensor, ...]:
        if self.reset == "after":
            return (cache.h_in,)
        return (cache.h_in, cache.n_recurrent)

    def __repr__(self) -> str:
        return f"GRUMath(reset={self.reset!r})"


def gru_math(reset: str, layer_norm: bool, bias: bool) -> GRUMath:
    """The math of a GRU variant (the layer-normalised one lives in cells/layer_norm.py)."""
    if not layer_norm:
        return GRUMath(reset)
    if not bias:
        raise ValueError("layer_norm=True needs bias=True (its biases are the layer norms')")
    from rnnkit.cells.layer_norm import LayerNormGRUMath  # (it imports this module)

    return LayerNormGRUMath(reset)


class GRUCell(RecurrentCell):
    """One GRU step: ``output, (h,) = cell(x_t, (h,))``; parameters as ``torch.nn.GRUCell``
    (``layer_norm=True``: the layer-normalised GRU of :mod:`rnnkit.cells.layer_norm`)."""

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
        reset: str = "after", layer_norm: bool = False,  # (after torch.nn.GRUCell's arguments)
    ) -> None:
        super().__init__(input_size, hidden_size, bias, gru_math(reset, layer_norm, bias), device,
                         dtype)
        self.reset = reset
        self.layer_norm = layer_norm

    @classmethod
    def from_torch(cls, module: nn.GRUCell) -> GRUCell:
        """An exact copy of a ``torch.nn.GRUCell`` (which is the ``reset="after"`` form)."""
        cell = cls(module.input_size, module.hidden_size, module.bias)
        return cls._copy_from_torch(cell, module)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, reset={self.reset!r}"
        return text + (", layer_norm=True" if self.layer_norm else "")
