"""The parallel scan of linear recurrences ``h_t = a_t ⊙ h_{t−1} + b_t`` (all steps at once).

Cells whose gates do not read ``h_{t−1}`` (minGRU, minLSTM) have a recurrence that is linear in
``h``, so every ``h_t`` is a closed form of the inputs::

    h_t = A_t ⊙ h_0 + Σ_{s ≤ t} (A_t / A_s) ⊙ b_s,        A_t = Π_{s ≤ t} a_s

computed in log space as Heinsen (2023) and Feng et al. (2024) do, where the products are
cumulative sums and the sum is one ``logcumsumexp``::

    a*_t = Σ_{s ≤ t} log a_s
    h_t  = exp(a*_t) ⊙ h_0 + exp(a*_t + logcumsumexp_{s ≤ t}(log b_s − a*_s))

``b_t`` must be positive (the cells make it so: see ``positive_activation``); ``h_0`` is applied
outside the log so it may have any sign. Every operation is a torch op over the whole (T, B, H)
tensor, so the time loop costs O(log T) depth instead of T sequential steps, and autograd
differentiates it (no hand-derived backward to check).
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_recurrence_scan(
    log_a: Tensor, log_b: Tensor, h0: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """All ``h_t`` of ``h_t = a_t ⊙ h_{t−1} + b_t`` from ``log a`` and ``log b``, both (T, B, H).

    Returns ``(outputs (T, B, H), h_final (B, H))``. With ``lengths`` (B,), steps at or past a
    row's length keep its state (``a = 1, b = 0``), its final state is the one after its own last
    step and its outputs past that step are zero — as the other rnnkit layers do.
    """
    if log_a.shape[0] == 0:
        return log_a.new_zeros(log_a.shape), h0
    running = None
    if lengths is not None:
        steps = torch.arange(log_a.shape[0], device=log_a.device).unsqueeze(1)  # (T, 1)
        running = (steps < lengths.to(log_a.device).unsqueeze(0)).unsqueeze(2)  # (T, B, 1)
        log_a = torch.where(running, log_a, torch.zeros_like(log_a))
        log_b = torch.where(running, log_b, torch.full_like(log_b, -torch.inf))
    a_star = torch.cumsum(log_a, dim=0)  # (T, B, H)
    h = torch.exp(a_star) * h0.unsqueeze(0) + torch.exp(
        a_star + torch.logcumsumexp(log_b - a_star, dim=0)
    )
    final = h[-1]
    if running is not None:
        h = h * running
    return h, final


def sequential_linear_recurrence(
    log_a: Tensor, log_b: Tensor, h0: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The same recurrence one step at a time: the reference the scan is tested against."""
    h, outputs = h0, []
    for t in range(log_a.shape[0]):
        new = torch.exp(log_a[t]) * h + torch.exp(log_b[t])
        if lengths is not None:
            running = (t < lengths.to(h.device)).unsqueeze(1)
            new = torch.where(running, new, h)
            outputs.append(new * running)
        else:
            outputs.append(new)
        h = new
    stacked = torch.stack(outputs) if outputs else log_a.new_zeros(log_a.shape)
    return stacked, h
