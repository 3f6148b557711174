"""The output layer and the cross-entropy as one step, for few classes over many positions.

``linear_cross_entropy(h, W, b, targets)`` is ``F.cross_entropy(F.linear(h, W, b), targets)``
(mean over the N rows of ``h``), computed in the class-major layout: the logits are made as
``W · hᵀ + b`` of shape (V, N), never as (N, V). Why: with few classes (copy memory: V = 10) at
many positions (N = T·B = 32,640) torch's kernels are slow in the row-major layout on this CPU,
measured on one thread (N = 32,640, H = 66, V = 10):

- ``log_softmax`` over the last dimension of (N, 10) takes 16 ms and its backward about as much,
  because its vector loop runs along the 10 classes; over the first dimension of (10, N) it runs
  along N: 0.2 ms.
- autograd's weight gradient of ``F.linear`` is ``hᵀ · g``, a (66 × 32,640) · (32,640 × 10) GEMM
  with N = 10 that takes 23 ms; ``gᵀ · h`` with g class-major, (10 × 32,640) · (32,640 × 66),
  takes 1.2 ms.

The log-probabilities are made once (forward) and saved; the backward reuses them (softmax =
exp of them) instead of recomputing the logits. NaN/inf propagate as in torch's composition: a
non-finite row of ``h`` makes the loss and the gradient of ``W`` and ``b`` non-finite and only
that row of ``h``'s gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
                ) -> Tensor:
        # (V, N) logits: one GEMM with the long dimension N as the output's fast axis
        logits = weight @ hidden.t()
        if bias is not None:
            logits += bias.unsqueeze(1)
        log_probs = torch.log_softmax(logits, dim=0)  # vectorised along N
        picked = log_probs.gather(0, targets.unsqueeze(0))  # (1, N)
        ctx.save_for_backward(hidden, weight, log_probs, targets)
        ctx.has_bias = bias is not None
        return -picked.mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, log_probs, targets = ctx.saved_tensors
        # d loss / d logits = (softmax − one-hot) / N, class-major (V, N)
        scores = log_probs.exp()
        scores.scatter_add_(0, targets.unsqueeze(0),
                            torch.full((1, targets.numel()), -1.0, dtype=scores.dtype,
                                       device=scores.device))
        scores *= grad / targets.numel()
        grad_hidden = scores.t() @ weight if ctx.needs_input_grad[0] else None  # (N, H)
        grad_weight = scores @ hidden if ctx.needs_input_grad[1] else None  # (V, H), K = N
        grad_bias = scores.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
                         ) -> Tensor:
    """Mean cross-entropy of ``hidden · weightᵀ + bias`` (N, V) against class ids ``targets``
    (N,): ``F.cross_entropy(F.linear(hidden, weight, bias), targets)``, computed class-major
    (see the module docstring). No ignore index, weights or smoothing: every row counts."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy needs hidden (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy needs targets ({hidden.shape[0]},), got "
                         f"{tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be class ids in [0, {weight.shape[0]}), got "
                         f"{int(targets.min())}..{int(targets.max())}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)
