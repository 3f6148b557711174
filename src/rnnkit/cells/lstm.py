r"""Long short-term memory, with peephole connections and coupled input-forget gates as options.

Gate blocks are stacked in ``torch.nn.LSTM``'s order i, f, g, o (coupled: i, g, o)::

    pre = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
    i_t = σ(pre_i + w_ci ⊙ c_{t-1})          # input gate   (w_ci: peephole only)
    f_t = σ(pre_f + w_cf ⊙ c_{t-1})          # forget gate  (coupled: f_t = 1 − i_t)
    g_t = tanh(pre_g)                        # candidate cell
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t          # cell state
    o_t = σ(pre_o + w_co ⊙ c_t)              # output gate peeks at the *new* cell (Gers 2000)
    h_t = o_t ⊙ tanh(c_t)                    # projected (LSTMP): h_t = W_hr (o_t ⊙ tanh(c_t))

Peepholes (Gers & Schmidhuber 2000) are diagonal weights ``weight_ci``, ``weight_cf``,
``weight_co`` of shape (H,); with ``coupled=True`` (CIFG, Greff et al. 2017) there is no forget
gate block and no ``weight_cf``. With a projection (Sak et al. 2014; ``torch.nn.LSTM``'s
``proj_size`` P > 0) ``weight_hr`` (P, H) maps the gated cell output to the P-wide ``h_t``, which is
both the output and the recurrent input (``weight_hh`` is then (4H, P)); ``c_t`` stays H wide.

Example::

    >>> import torch, rnnkit
    >>> cell = rnnkit.LSTMCell(4, 8, peephole=True)
    >>> output, state = cell(torch.randn(2, 4))
    >>> state.h.shape, state.c.shape
    (torch.Size([2, 8]), torch.Size([2, 8]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from rnnkit.cells.base import (
    CellMath,
    CellSpec,
    RecurrentCell,
    State,
    gate_bias_vectors,
    recurrent_input,
    recurrent_projection,
    sigmoid_grad,
    tanh_grad,
)

if TYPE_CHECKING:
    from rnnkit.cells.layer_norm import _LNLSTMCache

class LSTMState(NamedTuple):
    """The state of an LSTM: hidden output ``h`` and cell ``c``."""

    h: Tensor
    c: Tensor


class _LSTMCache(NamedTuple):
    h_prev: Tensor  # what W_hh multiplied: h_{t-1}, or h_{t-1} ⊙ m under recurrent dropout
    c_prev: Tensor
    i: Tensor
    f: Tensor
    g: Tensor
    o: Tensor
    c: Tensor
    tanh_c: Tensor
    m: Tensor | None  # o ⊙ tanh(c) before the projection (None without one)
    mask: Tensor | None = None  # recurrent dropout's mask


class LSTMMath(CellMath):
    kind = "lstm"
    state_names = ("h", "c")

    def __init__(self, peephole: bool = False, coupled: bool = False, projection: bool = False
                 ) -> None:
        self.peephole = peephole
        self.coupled = coupled
        self.projection = projection  # the last extra weight is weight_hr (P, H)
        self.num_gates = 3 if coupled else 4
        # chrono (Tallec & Ollivier 2018): b_f = log u, b_i = −b_f; coupled: f = 1 − i, so b_i = −log u
        self.chrono_gates = ((0, -1.0),) if coupled else ((1, 1.0), (0, -1.0))
        if peephole:
            self.diagonal_names = ("weight_ci", "weight_co") if coupled else (
                "weight_ci", "weight_cf", "weight_co")

    @property
    def spec(self) -> CellSpec:
        return CellSpec("lstm", peephole=self.peephole, coupled=self.coupled,
                        projection=self.projection)

    @property
    def extra_weight_names(self) -> tuple[str, ...]:
        return self.diagonal_names + (("weight_hr",) if self.projection else ())

    def make_state(self, tensors: Sequence[Tensor]) -> LSTMState:
        return LSTMState(*tensors)

    def _peepholes(self, diag: Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if self.projection:
            diag = diag[:-1]
        if not self.peephole:
            return None, None, None
        if self.coupled:
            w_ci, w_co = diag
            return w_ci, None, w_co
        w_ci, w_cf, w_co = diag
        return w_ci, w_cf, w_co

    def _gates(
        self, pre: Tensor, c_prev: Tensor, diag: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The gates and the new cell from the pre-activations ``pre`` (gate blocks i, f, g, o;
        i, g, o when coupled): shared by every LSTM form, layer-normalised ones included."""
        w_ci, w_cf, w_co = self._peepholes(diag)
        if self.coupled:
            pre_i, pre_g, pre_o = pre.chunk(3, dim=1)
        else:
            pre_i, pre_f, pre_g, pre_o = pre.chunk(4, dim=1)
        i = torch.sigmoid(pre_i + w_ci * c_prev if self.peephole else pre_i)
        if self.coupled:
            f = 1 - i
        else:
            f = torch.sigmoid(pre_f + w_cf * c_prev if self.peephole else pre_f)
        g = torch.tanh(pre_g)
        c = f * c_prev + i * g
        o = torch.sigmoid(pre_o + w_co * c if self.peephole else pre_o)
        return i, f, g, o, c

    def _gates_backward(
        self, dc: Tensor, d_pre_o: Tensor, cache: _LSTMCache | _LNLSTMCache, diag: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """:meth:`_gates` backward: from the cell's gradient ``dc`` (through h and the next step,
        before the output gate's peephole) and the output gate's pre-activation gradient, the
        pre-activations' gradient, the previous cell's and the peepholes'."""
        c_prev, i, f, g, c = cache.c_prev, cache.i, cache.f, cache.g, cache.c
        w_ci, w_cf, w_co = self._peepholes(diag)
        if self.peephole:
            dc = dc + d_pre_o * w_co
        d_i = dc * g
        d_f = dc * c_prev
        if self.coupled:
            d_i = d_i - d_f  # f = 1 − i routes the forget gradient into the input gate
        d_pre_i = d_i * sigmoid_grad(i)
        d_pre_g = dc * i * tanh_grad(g)
        dc_prev = dc * f
        if self.coupled:
            d_pre = torch.cat((d_pre_i, d_pre_g, d_pre_o), dim=1)
        else:
            d_pre_f = d_f * sigmoid_grad(f)
            d_pre = torch.cat((d_pre_i, d_pre_f, d_pre_g, d_pre_o), dim=1)
        d_peep: tuple[Tensor, ...] = ()
        if self.peephole:
            dc_prev = dc_prev + d_pre_i * w_ci
            d_w_ci = (d_pre_i * c_prev).sum(0)
            d_w_co = (d_pre_o * c).sum(0)
            if self.coupled:
                d_peep = (d_w_ci, d_w_co)
            else:
                dc_prev = dc_prev + d_pre_f * w_cf
                d_peep = (d_w_ci, (d_pre_f * c_prev).sum(0), d_w_co)
        return d_pre, dc_prev, d_peep

    def step(
        self, gx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None, diag: Sequence[Tensor],
        recurrent_mask: Tensor | None = None,
    ) -> tuple[State, _LSTMCache]:
        h_prev, c_prev = state
        h_in = recurrent_input(h_prev, recurrent_mask)
        i, f, g, o, c = self._gates(gx + recurrent_projection(h_in, w_hh, b_hh), c_prev, diag)
        tanh_c = torch.tanh(c)
        h = o * tanh_c
        m = None
        if self.projection:
            m, h = h, h @ diag[-1].t()
        return LSTMState(h, c), _LSTMCache(h_in, c_prev, i, f, g, o, c, tanh_c, m, recurrent_mask)

    def step_backward(
        self, d_state: State, cache: _LSTMCache, w_hh: Tensor, diag: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, State, tuple[Tensor, ...]]:
        dh, dc_next = d_state
        o, tanh_c, m, mask = cache.o, cache.tanh_c, cache.m, cache.mask
        d_w_hr: tuple[Tensor, ...] = ()
        if self.projection:  # h = m W_hrᵀ: dW_hr = dhᵀ m, and m's gradient continues as dh
            d_w_hr = (dh.t() @ m,)
            dh = dh @ diag[-1]
        d_pre_o = dh * tanh_c * sigmoid_grad(o)
        dc = dc_next + dh * o * tanh_grad(tanh_c)
        d_pre, dc_prev, d_diag = self._gates_backward(dc, d_pre_o, cache, diag)
        dh_prev = recurrent_input(d_pre @ w_hh, mask)
        return d_pre, d_pre, LSTMState(dh_prev, dc_prev), d_diag + d_w_hr

    def __repr__(self) -> str:
        text = f"LSTMMath(peephole={self.peephole}, coupled={self.coupled}"
        return text + (", projection=True)" if self.projection else ")")


def init_forget_bias(
    bias_ih: Tensor | None, bias_hh: Tensor | None, hidden_size: int, coupled: bool, value: float
) -> None:
    """Makes the total forget-gate bias ``value`` (TensorFlow's ``forget_bias``).

    With coupled gates there is no forget block; f = 1 − σ(pre_i), so the input-gate bias is set to
    −value, which starts f at σ(value) just the same.
    """
    if bias_ih is None or bias_hh is None:
        raise ValueError("forget_bias needs bias=True")
    rows = slice(0, hidden_size) if coupled else slice(hidden_size, 2 * hidden_size)
    with torch.no_grad():
        bias_ih[rows] = -value if coupled else value
        bias_hh[rows] = 0.0


def lstm_math(peephole: bool, coupled: bool, layer_norm: bool, bias: bool,
              projection: bool = False) -> LSTMMath:
    """The math of an LSTM variant (the layer-normalised one lives in cells/layer_norm.py)."""
    if not layer_norm:
        return LSTMMath(peephole, coupled, projection)
    if projection:
        raise ValueError("layer_norm=True with proj_size > 0 is not implemented")
    if not bias:
        raise ValueError("layer_norm=True needs bias=True (its biases are the layer norms')")
    from rnnkit.cells.layer_norm import LayerNormLSTMMath  # (it imports this module)

    return LayerNormLSTMMath(peephole, coupled)


class LSTMCell(RecurrentCell):
    """One LSTM step: ``output, LSTMState(h, c) = cell(x_t, state)``.

    Parameters as ``torch.nn.LSTMCell`` plus ``weight_ci``/``weight_cf``/``weight_co`` with
    ``peephole=True``; ``coupled=True`` drops the forget block (f = 1 − i);
    ``layer_norm=True`` is the layer-normalised LSTM (:mod:`rnnkit.cells.layer_norm`).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,  # (torch.nn.LSTMCell's arguments first: a positional device was peephole)
        peephole: bool = False,
        coupled: bool = False,
        forget_bias: float | None = None,
        layer_norm: bool = False,
    ) -> None:
        self.peephole = peephole
        self.coupled = coupled
        self.forget_bias = forget_bias
        self.layer_norm = layer_norm
        super().__init__(input_size, hidden_size, bias,
                         lstm_math(peephole, coupled, layer_norm, bias), device, dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.forget_bias is not None:
            init_forget_bias(*gate_bias_vectors(self, ""), self.hidden_size, self.coupled,
                             self.forget_bias)

    @property
    def state_size(self) -> LSTMState:
        return LSTMState(self.hidden_size, self.hidden_size)

    @classmethod
    def from_torch(cls, module: nn.LSTMCell) -> LSTMCell:
        """An exact copy of a ``torch.nn.LSTMCell``."""
        cell = cls(module.input_size, module.hidden_size, module.bias)
        return cls._copy_from_torch(cell, module)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, peephole={self.peephole}, coupled={self.coupled}"
        return text + (", layer_norm=True" if self.layer_norm else "")
