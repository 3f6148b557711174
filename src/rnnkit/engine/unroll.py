"""``unroll``: any cell, one step at a time, over a whole sequence (the material's dynamic_rnn)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.engine.lengths import reverse_within_lengths
from rnnkit.state_tree import map_state
from rnnkit.validation import check_lengths, check_steps


def unroll(
    cell: nn.Module,
    inputs: Tensor,
    initial_state: Any = None,
    lengths: Sequence[int] | Tensor | None = None,
    reverse: bool = False,
    batch_first: bool = False,
) -> tuple[Tensor, Any]:
    """Runs ``cell`` over ``inputs`` (T, B, I) and returns ``(outputs (T, B, O), final_state)``.

    Works for any module with the cell contract ``output, state = cell(x_t, state)`` and a
    ``zero_state(batch_size, dtype, device)``. With ``lengths``, each sequence's final state is the
    one after its own last step and its outputs past that step are zero; ``reverse=True`` reads
    each sequence backwards from its own last step (outputs stay aligned with the inputs).
    """
    if inputs.dim() != 3:
        raise ValueError(
            f"unroll expects inputs of shape (seq_len, batch, input_size), got {tuple(inputs.shape)}"
        )
    if batch_first:
        inputs = inputs.transpose(0, 1)
    steps, batch = inputs.shape[0], inputs.shape[1]
    check_steps("inputs", steps)
    if lengths is not None:
        lengths = check_lengths(lengths, batch, steps, inputs.device)
    if reverse:
        inputs = reverse_within_lengths(inputs, lengths)
    if lengths is not None:
        # The cell runs on the padding too (its results are discarded), so padding is made 0:
        # a NaN there would otherwise reach the weight gradients through 0 * NaN.
        inside = torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)
        inputs = torch.where(inside.to(inputs.device).unsqueeze(2), inputs,
                             torch.zeros((), dtype=inputs.dtype, device=inputs.device))
    state = initial_state
    if state is None:
        state = cell.zero_state(batch, dtype=inputs.dtype, device=inputs.device)
    outputs = []
    for t in range(steps):
        output, new_state = cell(inputs[t], state)
        if lengths is not None:
            running = (t < lengths).to(inputs.device).unsqueeze(1)
            new_state = map_state(
                lambda new, old, running=running: torch.where(running, new, old), new_state, state
            )
            output = torch.where(running, output, torch.zeros_like(output))  # (0 even for NaN)
        state = new_state
        outputs.append(output)
    stacked = torch.stack(outputs)
    if reverse:
        stacked = reverse_within_lengths(stacked, lengths)
    if batch_first:
        stacked = stacked.transpose(0, 1)
    return stacked, state
