"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs all we needed?"): gates that read only x_t.

Because no gate reads ``h_{t−1}``, the recurrence is linear in ``h`` and a whole sequence runs as one
parallel scan (:mod:`rnnkit.engine.scan`) for training; generation runs the same math one step at
a time. Both forms are the paper's log-space versions, whose candidate state is kept positive by
``g`` so that it has a logarithm.

minGRU, with ``[k; v] = W_ih x_t + b_ih`` (two blocks of H rows)::

    z_t   = σ(k)                               update gate
    h̃_t   = g(v)                               candidate state, g(v) = v + ½ (v ≥ 0), σ(v) (v < 0)
    h_t   = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t

minLSTM, with ``[k_f; k_i; v] = W_ih x_t + b_ih`` (three blocks)::

    f_t   = σ(k_f)                              forget gate
    i_t   = σ(k_i)                              input gate
    f'_t  = f_t / (f_t + i_t)                   normalised so the scale of h does not depend on t
    i'_t  = i_t / (f_t + i_t)
    h̃_t   = g(v)
    h_t   = f'_t ⊙ h_{t−1} + i'_t ⊙ h̃_t

Example::

    >>> cell = MinGRUCell(3, 8)
    >>> h, state = cell(torch.randn(4, 3), cell.zero_state(4))
    >>> h.shape
    torch.Size([4, 8])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.validation import check_cell_input, check_cell_sizes


def positive_activation(v: Tensor) -> Tensor:
    """g(v) = v + ½ for v ≥ 0 and σ(v) below: continuous, increasing and always positive."""
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def log_positive_activation(v: Tensor) -> Tensor:
    """log g(v), computed without forming g(v) where it would underflow (−softplus(−v) below 0)."""
    return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), -F.softplus(-v))


class MinimalMath:
    """One family's gates as ``(log a_t, log b_t)`` of the linear recurrence h_t = a_t h_{t−1} + b_t."""

    kind: str
    kernel_kind: int
    num_gates: int
    chrono_gates: tuple[tuple[int, float], ...]  # as CellMath.chrono_gates
    state_names: tuple[str, ...] = ("h",)

    def make_state(self, tensors: tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
        return tuple(tensors)

    def coefficients(self, gx: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, gx: Tensor, h: Tensor) -> Tensor:
        """One step from the same coefficients the scan uses (so step and scan agree exactly)."""
        log_a, log_b = self.coefficients(gx)
        return torch.exp(log_a) * h + torch.exp(log_b)


class MinGRUMath(MinimalMath):
    kind = "mingru"
    kernel_kind = 0  # the C++ operator's name for it (rnnkit.engine.csrc.scan)
    num_gates = 2
    chrono_gates = ((0, -1.0),)  # z updates h: b_z = −log u, so 1 − z = σ(log u) keeps it

    def coefficients(self, gx: Tensor) -> tuple[Tensor, Tensor]:
        k, v = gx.chunk(2, dim=-1)
        log_keep = -F.softplus(k)  # log(1 − z)
        log_update = -F.softplus(-k)  # log z
        return log_keep, log_update + log_positive_activation(v)


class MinLSTMMath(MinimalMath):
    kind = "minlstm"
    kernel_kind = 1
    num_gates = 3
    chrono_gates = ((0, 1.0), (1, -1.0))  # b_f = log u, b_i = −b_f: f' = σ(log u) as minGRU

    def coefficients(self, gx: Tensor) -> tuple[Tensor, Tensor]:
        k_f, k_i, v = gx.chunk(3, dim=-1)
        # log f' = log f − log(f + i) = −softplus(log i − log f), with log σ(k) = −softplus(−k)
        log_ratio = F.softplus(-k_f) - F.softplus(-k_i)  # log f − log i
        log_forget = -F.softplus(log_ratio)
        log_input = -F.softplus(-log_ratio)
        return log_forget, log_input + log_positive_activation(v)


MINIMAL_MATHS: dict[str, type[MinimalMath]] = {"mingru": MinGRUMath, "minlstm": MinLSTMMath}


def pickle_minimal(state: dict[str, Any]) -> dict[str, Any]:
    """A module's pickled ``__dict__`` with its math as its kind (a plain value), so that
    ``torch.load(weights_only=True)`` needs only the module class allowed (as
    :func:`rnnkit.cells.base.pickle_state` does for the other cells)."""
    return {**state, "math": state["math"].kind}


def unpickle_minimal(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "math": MINIMAL_MATHS[state["math"]]()}


class MinimalCell(nn.Module):
    """One step of a minimal cell: ``output, (h,) = cell(x_t, (h,))``; parameters as torch's cells."""

    def __init__(self, math_: MinimalMath, input_size: int, hidden_size: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}  # as torch.nn's factory arguments
        check_cell_sizes(input_size, hidden_size)
        self.math = math_
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        rows = math_.num_gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory_kwargs))
        self.bias_ih = nn.Parameter(torch.empty(rows, **factory_kwargs)) if bias else None
        bound = 1.0 / math.sqrt(hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @property
    def state_size(self) -> int:
        return self.hidden_size

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def zero_state(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> tuple[Tensor]:
        return (torch.zeros(batch_size, self.hidden_size, dtype=dtype or self.weight_ih.dtype,
                            device=device or self.weight_ih.device),)

    def forward(
        self, x_t: Tensor, state: tuple[Tensor] | Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor]]:
        unbatched = x_t.dim() == 1
        x_t, state = check_cell_input(self, x_t, state)
        h = self.zero_state(x_t.shape[0], x_t.dtype, x_t.device)[0] if state is None else state[0]
        h = self.math.step(F.linear(x_t, self.weight_ih, self.bias_ih), h)
        if unbatched:
            h = h.squeeze(0)
        return h, (h,)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}"

    def __getstate__(self) -> dict[str, Any]:
        return pickle_minimal(super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(unpickle_minimal(state))


class MinGRUCell(MinimalCell):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(MinGRUMath(), input_size, hidden_size, bias, device, dtype)


class MinLSTMCell(MinimalCell):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(MinLSTMMath(), input_size, hidden_size, bias, device, dtype)
