r"""Layer-normalised LSTM and GRU (Ba, Kiros & Hinton 2016, §3.1 and their appendix).

The input projection and the recurrent projection are normalised *separately*, each over all
G·H columns of a row with its own gain and bias, so the two sums cannot drift apart in scale;
the LSTM also normalises its cell state before the output tanh. LN(a; γ, β) = γ ⊙ (a − μ)/σ + β
with μ, σ² the mean and (biased) variance of the row and σ = √(σ² + 1e-5), as ``F.layer_norm``.

LSTM (``layer_norm=True``, blocks i, f, g, o as torch.nn.LSTM; coupled: i, g, o)::

    pre = LN(W_ih x_t; γ_ih, β_ih) + LN(W_hh h_{t-1}; γ_hh, β_hh)
    i_t = σ(pre_i + w_ci ⊙ c_{t-1})          # input gate   (w_ci: peephole only)
    f_t = σ(pre_f + w_cf ⊙ c_{t-1})          # forget gate  (coupled: f_t = 1 − i_t)
    g_t = tanh(pre_g)                        # candidate cell
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t          # cell state (kept un-normalised, as in the paper)
    o_t = σ(pre_o + w_co ⊙ c_t)              # output gate (peephole reads the raw c_t)
    h_t = o_t ⊙ tanh(LN(c_t; γ_c, β_c))      # the cell LN sits only on the way to the output

GRU (``layer_norm=True``, blocks r, z, n as torch.nn.GRU)::

    gx = LN(W_ih x_t; γ_ih, β_ih)                                       (all three blocks)
    reset="after":  gh = LN(W_hh h_{t-1}; γ_hh, β_hh)                   (all three blocks)
                    r_t = σ(gx_r + gh_r);  z_t = σ(gx_z + gh_z)
                    n_t = tanh(gx_n + r_t ⊙ gh_n)
    reset="before": gh_rz = LN(W_h[rz] h_{t-1}; γ_hh[rz], β_hh[rz])     (the r, z blocks)
                    r_t = σ(gx_r + gh_r);  z_t = σ(gx_z + gh_z)
                    n_t = tanh(gx_n + LN(W_hn (r_t ⊙ h_{t-1}); γ_hh[n], β_hh[n]))
    h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}

In the "before" form the n block's product needs r_t, which needs the r/z blocks' statistics, so
the n block is normalised on its own (over its H columns) — one LN over all 3H would be circular.

Parameters (torch naming, ``_l{k}[_reverse]`` appended in the layers): ``ln_ih_weight``,
``ln_ih_bias``, ``ln_hh_weight``, ``ln_hh_bias`` of shape (G·H,) and, for the LSTM,
``ln_cell_weight``, ``ln_cell_bias`` of shape (H,); gains start at 1 and biases at 0 (as
``nn.LayerNorm``). The LN biases *are* the cell's biases: a ``bias_ih``/``bias_hh`` added after a
layer norm would only repeat its β, so these cells have none (they need ``bias=True``). haste's
``LayerNormLSTM`` makes the same choice with one ``bias`` and gains ``gamma``, ``gamma_h``.

Where each LN is computed: the input LN is per row and per step, so the engine applies it once to
the whole (T·B, G·H) input projection before the time loop, under autograd
(:func:`normalized_input`, for every backend alike); the recurrent and cell LNs are in the step
below, with their hand-derived backward (:func:`layer_norm_backward`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.cells.base import CellSpec, State, sigmoid_grad, tanh_grad
from rnnkit.cells.gru import GRUMath
from rnnkit.cells.lstm import LSTMMath, LSTMState

EPS = 1e-5  # F.layer_norm's and nn.LayerNorm's default
INPUT_NORM_NAMES = ("ln_ih_weight", "ln_ih_bias")
RECURRENT_NORM_NAMES = ("ln_hh_weight", "ln_hh_bias")
CELL_NORM_NAMES = ("ln_cell_weight", "ln_cell_bias")


def layer_norm_forward(a: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``LN(a; weight, bias)`` over the last dimension, with ``â`` and ``1/σ`` for the backward.

    torch's own ``native_layer_norm`` (what ``F.layer_norm`` calls), so the numbers are torch's
    and the reference engine differentiates it with torch's formula.
    """
    y, mean, rstd = torch.native_layer_norm(a, (a.shape[-1],), weight, bias, EPS)
    return y, (a - mean) * rstd, rstd


def layer_norm_backward(
    dy: Tensor, a_hat: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(da, d_weight, d_bias)`` of ``y = weight ⊙ â + bias`` with ``â = (a − μ)·rstd``.

    With ``g = dy ⊙ weight``: da = rstd · (g − mean(g) − â ⊙ mean(g ⊙ â)) — the mean and variance
    both depend on every column, which is where the two mean terms come from.
    """
    g = dy * weight
    da = rstd * (g - g.mean(-1, keepdim=True) - a_hat * (g * a_hat).mean(-1, keepdim=True))
    return da, (dy * a_hat).sum(0), dy.sum(0)


def normalized_input(
    x: Tensor, params: Sequence[Tensor | None],
    project: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """``LN(x W_ih^T)`` for all steps at once and the params left for the time loop.

    ``params`` is the layer's ``(w_ih, w_hh, None, None, ln_ih_weight, ln_ih_bias, *rest)``; the
    result is ``(gx (T, B, G·H), (None, w_hh, None, None, *rest))`` — a ``w_ih`` of None tells the
    backends that ``x`` is already the input projection. Autograd differentiates this part.
    ``project(x, w_ih)`` computes ``x @ w_ih.t()`` (a backend's faster product; default torch's).
    """
    w_ih, w_hh, b_ih, b_hh, weight, bias, *rest = params
    projected = x @ w_ih.t() if project is None else project(x, w_ih)
    gx = F.layer_norm(projected, (w_ih.shape[0],), weight, bias, EPS)
    return gx, (None, w_hh, b_ih, b_hh, *rest)


def layer_norm_initial_value(name: str) -> float | None:
    """Gain 1 and bias 0 for a layer-norm parameter (any ``_l{k}`` suffix), None for others."""
    if not name.startswith("ln_"):
        return None
    return 1.0 if "_weight" in name else 0.0


class _LNLSTMCache(NamedTuple):
    h_prev: Tensor
    c_prev: Tensor
    i: Tensor
    f: Tensor
    g: Tensor
    o: Tensor
    c: Tensor
    tanh_c: Tensor  # tanh(LN(c))
    a_hat: Tensor  # normalised W_hh h_{t-1}
    rstd: Tensor
    c_hat: Tensor  # normalised c_t
    c_rstd: Tensor


class LayerNormLSTMMath(LSTMMath):
    """The LSTM step with layer-normalised recurrent projection and cell (module docstring)."""

    layer_norm = True
    has_bias_vectors = False
    shares_preactivation_grad = False  # d(gx) is taken after the recurrent LN, d(gh) before it

    def __init__(self, peephole: bool = False, coupled: bool = False) -> None:
        super().__init__(peephole, coupled)
        self.diagonal_names = (*INPUT_NORM_NAMES, *RECURRENT_NORM_NAMES, *CELL_NORM_NAMES,
                               *self.diagonal_names)

    @property
    def spec(self) -> CellSpec:
        return CellSpec("lstm", peephole=self.peephole, coupled=self.coupled, layer_norm=True)

    def initial_value(self, name: str) -> float | None:
        return layer_norm_initial_value(name)

    def diagonal_size(self, name: str, hidden_size: int) -> int:
        if name in INPUT_NORM_NAMES or name in RECURRENT_NORM_NAMES:
            return self.num_gates * hidden_size
        return hidden_size

    def step(
        self, gx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None, diag: Sequence[Tensor]
    ) -> tuple[State, _LNLSTMCache]:
        h_prev, c_prev = state
        ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias, *peepholes = diag
        gh, a_hat, rstd = layer_norm_forward(h_prev @ w_hh.t(), ln_hh_weight, ln_hh_bias)
        i, f, g, o, c = self._gates(gx + gh, c_prev, peepholes)
        c_norm, c_hat, c_rstd = layer_norm_forward(c, ln_c_weight, ln_c_bias)
        tanh_c = torch.tanh(c_norm)
        h = o * tanh_c
        cache = _LNLSTMCache(h_prev, c_prev, i, f, g, o, c, tanh_c, a_hat, rstd, c_hat, c_rstd)
        return LSTMState(h, c), cache

    def step_backward(
        self, d_state: State, cache: _LNLSTMCache, w_hh: Tensor, diag: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, State, tuple[Tensor, ...]]:
        dh, dc_next = d_state
        o, tanh_c, a_hat, rstd, c_hat, c_rstd = cache.o, cache.tanh_c, *cache[-4:]
        ln_hh_weight, _, ln_c_weight, _, *peepholes = diag
        d_pre_o = dh * tanh_c * sigmoid_grad(o)
        dc_from_h, d_c_weight, d_c_bias = layer_norm_backward(
            dh * o * tanh_grad(tanh_c), c_hat, c_rstd, ln_c_weight)
        d_pre, dc_prev, d_peep = self._gates_backward(dc_next + dc_from_h, d_pre_o, cache, peepholes)
        d_a, d_hh_weight, d_hh_bias = layer_norm_backward(d_pre, a_hat, rstd, ln_hh_weight)
        dh_prev = d_a @ w_hh
        d_diag = (d_hh_weight, d_hh_bias, d_c_weight, d_c_bias, *d_peep)
        return d_pre, d_a, LSTMState(dh_prev, dc_prev), d_diag

    def __repr__(self) -> str:
        return (f"LayerNormLSTMMath(peephole={self.peephole}, coupled={self.coupled})")


class _LNGRUCache(NamedTuple):
    h_prev: Tensor
    r: Tensor
    z: Tensor
    n: Tensor
    # reset="after": the normalised n block LN(W_hh h)_n (needed for dr); "before": r ⊙ h
    n_recurrent: Tensor
    a_hat: Tensor  # after: normalised W_hh h (3H); before: normalised W_h[rz] h (2H)
    rstd: Tensor
    n_hat: Tensor | None  # before only: normalised W_hn (r ⊙ h)
    n_rstd: Tensor | None


class LayerNormGRUMath(GRUMath):
    """The GRU step with a layer-normalised recurrent projection (module docstring)."""

    layer_norm = True

    def recurrent_inputs(self, cache: _LNGRUCache) -> tuple[Tensor, ...]:  # (no dropout masks)
        if self.reset == "after":
            return (cache.h_prev,)
        return (cache.h_prev, cache.n_recurrent)
    has_bias_vectors = False

    def __init__(self, reset: str = "after") -> None:
        super().__init__(reset)
        self.diagonal_names = (*INPUT_NORM_NAMES, *RECURRENT_NORM_NAMES)

    @property
    def spec(self) -> CellSpec:
        return CellSpec("gru", reset=self.reset, layer_norm=True)

    def initial_value(self, name: str) -> float | None:
        return layer_norm_initial_value(name)

    def diagonal_size(self, name: str, hidden_size: int) -> int:
        return self.num_gates * hidden_size

    def step(
        self, gx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None, diag: Sequence[Tensor]
    ) -> tuple[State, _LNGRUCache]:
        (h_prev,) = state
        ln_weight, ln_bias = diag
        hidden = h_prev.shape[1]
        rz, n_rows = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
        gx_r, gx_z, gx_n = gx.chunk(3, dim=1)
        n_hat = n_rstd = None
        if self.reset == "after":
            gh, a_hat, rstd = layer_norm_forward(h_prev @ w_hh.t(), ln_weight, ln_bias)
            gh_r, gh_z, gh_n = gh.chunk(3, dim=1)
        else:
            gh, a_hat, rstd = layer_norm_forward(h_prev @ w_hh[rz].t(), ln_weight[rz],
                                                 ln_bias[rz])
            gh_r, gh_z = gh.chunk(2, dim=1)
        r = torch.sigmoid(gx_r + gh_r)
        z = torch.sigmoid(gx_z + gh_z)
        if self.reset == "after":
            n = torch.tanh(gx_n + r * gh_n)
            n_recurrent = gh_n
        else:
            n_recurrent = r * h_prev
            gh_n, n_hat, n_rstd = layer_norm_forward(n_recurrent @ w_hh[n_rows].t(),
                                                     ln_weight[n_rows], ln_bias[n_rows])
            n = torch.tanh(gx_n + gh_n)
        h = (1 - z) * n + z * h_prev
        return (h,), _LNGRUCache(h_prev, r, z, n, n_recurrent, a_hat, rstd, n_hat, n_rstd)

    def step_backward(
        self, d_state: State, cache: _LNGRUCache, w_hh: Tensor, diag: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, State, tuple[Tensor, ...]]:
        (dh,) = d_state
        h_prev, r, z, n, n_recurrent, a_hat, rstd, n_hat, n_rstd = cache
        ln_weight = diag[0]
        hidden = h_prev.shape[1]
        rz, n_rows = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
        d_pre_n = dh * (1 - z) * tanh_grad(n)
        # the two products autograd forms (see GRUMath.step_backward: inf and NaN as torch)
        d_pre_z = (dh * h_prev - dh * n) * sigmoid_grad(z)
        dh_prev = dh * z
        if self.reset == "after":
            d_pre_r = d_pre_n * n_recurrent * sigmoid_grad(r)
            d_gh_norm = torch.cat((d_pre_r, d_pre_z, d_pre_n * r), dim=1)
            d_gh, d_weight, d_bias = layer_norm_backward(d_gh_norm, a_hat, rstd, ln_weight)
            dh_prev = dh_prev + d_gh @ w_hh
        else:
            d_n, d_weight_n, d_bias_n = layer_norm_backward(d_pre_n, n_hat, n_rstd,
                                                            ln_weight[n_rows])
            d_reset_h = d_n @ w_hh[n_rows]
            d_pre_r = d_reset_h * h_prev * sigmoid_grad(r)
            d_rz, d_weight_rz, d_bias_rz = layer_norm_backward(
                torch.cat((d_pre_r, d_pre_z), dim=1), a_hat, rstd, ln_weight[rz])
            d_gh = torch.cat((d_rz, d_n), dim=1)
            d_weight = torch.cat((d_weight_rz, d_weight_n))
            d_bias = torch.cat((d_bias_rz, d_bias_n))
            dh_prev = dh_prev + d_reset_h * r + d_rz @ w_hh[rz]
        d_gx = torch.cat((d_pre_r, d_pre_z, d_pre_n), dim=1)
        return d_gx, d_gh, (dh_prev,), (d_weight, d_bias)

    def __repr__(self) -> str:
        return f"LayerNormGRUMath(reset={self.reset!r})"
