"""Laying a long token stream out as B parallel rows, as pytorch examples' ``batchify`` does.

Row b holds the b-th contiguous slice of the stream, so consecutive windows of the (N, B) layout
continue each row's own text and a recurrent state can be carried from one window to the next.
"""

from __future__ import annotations

import torch
from torch import Tensor


def batchify(tokens: Tensor, batch_size: int) -> Tensor:
    """(N·B + r,) → (N, B): row b is the contiguous slice ``tokens[b·N:(b+1)·N]``; r is dropped."""
    steps = tokens.numel() // batch_size
    if steps < 2:
        raise ValueError(
            f"a stream of {tokens.numel()} tokens is too short for batch size {batch_size}"
        )
    return tokens[: steps * batch_size].view(batch_size, steps).t().contiguous()  # (N, B)


def stream_window(stream: Tensor, start: int, length: int) -> tuple[Tensor, Tensor]:
    """Inputs ``stream[start:start+len]`` and next-token targets, each (len', B), len' ≤ length."""
    length = min(length, stream.shape[0] - 1 - start)
    return stream[start : start + length], stream[start + 1 : start + 1 + length]


def num_windows(stream: Tensor, length: int) -> int:
    """How many windows of ``length`` cover a batchified stream (the last may be shorter)."""
    return -(-(stream.shape[0] - 1) // length)


def encode_tensor(indices: list[int]) -> Tensor:
    return torch.tensor(indices, dtype=torch.long)


def evaluation_rows(tokens: int, seq_len: int, most: int) -> int:
    """Rows to lay a held-out stream of ``tokens`` out in: up to ``most``, each row at least a
    window long. Validation and ``evaluate`` share it, so the same text scores the same."""
    return max(1, min(most, tokens // (seq_len + 1)))
