"""A multi-layer cell: several cells applied one after another within a single time step."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.cells.base import RecurrentCell
from rnnkit.state_tree import map_state


class StackedCell(nn.Module):
    """Cells stacked in depth, as the material's ``MultiRNNCell``: cell k+1 reads cell k's output.

    The state is a tuple with one state per cell; the output is the last cell's output.

    Example::

        >>> import torch, rnnkit
        >>> cell = rnnkit.StackedCell([rnnkit.LSTMCell(4, 8), rnnkit.GRUCell(8, 8)])
        >>> output, (lstm_state, gru_state) = cell(torch.randn(2, 4))
        >>> output.shape
        torch.Size([2, 8])
    """

    def __init__(self, cells: Sequence[RecurrentCell | StackedCell]) -> None:
        super().__init__()
        if len(cells) == 0:
            raise ValueError("StackedCell needs at least one cell")
        for below, above in pairwise(cells):
            if below.output_size != above.input_size:
                raise ValueError(
                    f"StackedCell: a cell with output_size {below.output_size} feeds a cell "
                    f"with input_size {above.input_size}"
                )
        self.cells = nn.ModuleList(cells)

    @property
    def input_size(self) -> int:
        return self.cells[0].input_size

    @property
    def state_size(self) -> tuple[Any, ...]:
        return tuple(cell.state_size for cell in self.cells)

    @property
    def output_size(self) -> int:
        return self.cells[-1].output_size

    def zero_state(
        self,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Any, ...]:
        return tuple(cell.zero_state(batch_size, dtype, device) for cell in self.cells)

    def forward(self, x_t: Tensor, state: tuple[Any, ...] | None = None) -> tuple[Tensor, tuple]:
        if state is None:
            batch = x_t.shape[0] if x_t.dim() > 1 else 1
            state = self.zero_state(batch, x_t.dtype, x_t.device)
            if x_t.dim() == 1:
                state = map_state(lambda s: s.squeeze(0), state)
        if len(state) != len(self.cells):
            raise ValueError(
                f"StackedCell of {len(self.cells)} cells got a state with {len(state)} entries"
            )
        new_states = []
        output = x_t
        for cell, cell_state in zip(self.cells, state):
            output, new_state = cell(output, cell_state)
            new_states.append(new_state)
        return output, tuple(new_states)

