r"""The Elman (simple) recurrent cell.

.. math::

    h_t = f(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}),
    \qquad f \in \{\tanh, \mathrm{relu}, \sigma, \mathrm{id}\}

``identity`` (f(a) = a) is the linear RNN: with an orthogonal W_hh (``rnnkit.RNN(...,
orthogonal="exp")``) it carries its state for any number of steps without loss, the regime
expRNN's modReLU (Lezcano-Casado & Martínez-Rubio 2019) works in when its bias is near 0.

The material's output layer ``o_t = g(V h_t + c)`` is an ordinary ``nn.Linear`` on top of the
outputs; it is not part of the recurrence.

Example::

    >>> import torch, rnnkit
    >>> cell = rnnkit.RNNCell(4, 8, nonlinearity="tanh")
    >>> output, state = cell(torch.randn(2, 4))
    >>> output.shape, state[0].shape
    (torch.Size([2, 8]), torch.Size([2, 8]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rnnkit.cells.base import (
    CellMath,
    CellSpec,
    RecurrentCell,
    State,
    recurrent_input,
    recurrent_projection,
)

NONLINEARITIES = ("tanh", "relu", "sigmoid", "identity")


class ElmanMath(CellMath):
    kind = "rnn"
    num_gates = 1

    def __init__(self, nonlinearity: str = "tanh") -> None:
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}"
            )
        self.nonlinearity = nonlinearity

    @property
    def spec(self) -> CellSpec:
        return CellSpec("rnn", nonlinearity=self.nonlinearity)

    def activation(self, pre: Tensor) -> Tensor:
        if self.nonlinearity == "tanh":
            return torch.tanh(pre)
        if self.nonlinearity == "relu":
            return torch.relu(pre)
        if self.nonlinearity == "identity":
            return pre
        return torch.sigmoid(pre)

    def activation_backward(self, dh: Tensor, h: Tensor) -> Tensor:
        """d(loss)/d(pre) from d(loss)/dh and the output h = f(pre), as torch's autograd forms it.

        relu uses torch's own ``threshold_backward`` (the gradient passes where h is NaN and is
        an exact 0 where h <= 0, even for a NaN or infinite dh), so that NaN and inf propagate
        exactly as through ``torch.relu``; a mask product ``dh * (h > 0)`` would differ in both.
        """
        if self.nonlinearity == "tanh":
            return torch.ops.aten.tanh_backward(dh, h)
        if self.nonlinearity == "relu":
            return torch.ops.aten.threshold_backward(dh, h, 0)
        if self.nonlinearity == "identity":
            return dh
        return torch.ops.aten.sigmoid_backward(dh, h)

    def step(
        self, gx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None, diag: Sequence[Tensor],
        recurrent_mask: Tensor | None = None,
    ) -> tuple[State, tuple[Tensor, Tensor, Tensor | None]]:
        (h_prev,) = state
        h_in = recurrent_input(h_prev, recurrent_mask)
        h = self.activation(gx + recurrent_projection(h_in, w_hh, b_hh))
        return (h,), (h_in, h, recurrent_mask)

    def step_backward(
        self, d_state: State, cache: tuple[Tensor, Tensor, Tensor | None], w_hh: Tensor,
        diag: Sequence[Tensor],
    ) -> tuple[Tensor, Tensor, State, tuple[Tensor, ...]]:
        (dh,) = d_state
        _, h, mask = cache
        d_pre = self.activation_backward(dh, h)
        return d_pre, d_pre, (recurrent_input(d_pre @ w_hh, mask),), ()

    def __repr__(self) -> str:
        return f"ElmanMath(nonlinearity={self.nonlinearity!r})"


class RNNCell(RecurrentCell):
    """One Elman step: ``output, (h,) = cell(x_t, (h,))``; parameters as ``torch.nn.RNNCell``."""

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, ElmanMath(nonlinearity), device, dtype)
        self.nonlinearity = nonlinearity

    @classmethod
    def from_torch(cls, module: nn.RNNCell) -> RNNCell:
        """An exact copy of a ``torch.nn.RNNCell``."""
        cell = cls(module.input_size, module.hidden_size, module.bias, module.nonlinearity)
        return cls._copy_from_torch(cell, module)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity!r}"
