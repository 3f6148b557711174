"""The output layer and the cross-entropy as one step, for few classes over many positions.

``linear_cross_entropy(h, W, b, targets)`` is ``F.cross_entropy(F.linear(h, W, b), targets)``
(mean over the N rows of ``h``), computed in the class-major layout: the logits are made as
``W · hᵀ + b`` of shape (V, N), never as (N, V). Why: with few classes (copy memory: V = 10) at
many positions (N = T·B = 32,640) torch's kernels are slow in the row-major layout on this CPU,
measured on one thread (minimum CPU time; N = 32,640, H = 66, V = 10):

- ``log_softmax`` over the last dimension of (N, 10) takes 5.0 ms, because its vector loop runs
  along the 10 classes; over the first dimension of (10, N) it runs along N: 0.25 ms.
- autograd's weight gradient of ``F.linear`` is ``hᵀ · g``, a (66 × 32,640) · (32,640 × 10) GEMM
  with N = 10 that takes 8.1 ms; ``gᵀ · h`` with g class-major, (10 × 32,640) · (32,640 × 66),
  takes 1.3 ms.

Forward and backward together: 6.8 ms instead of torch's 14.9 ms. The softmax is saved in the
forward, so the backward recomputes no logits. NaN/inf propagate as in torch's composition: a
non-finite row of ``h`` makes the loss and the gradient of ``W`` and ``b`` non-finite and only
that row of ``h``'s gradient.

Where it can (CPU float32/float64, V ≤ 16, the C++ kernels built) one C++ operator,
``csrc/linear_cross_entropy.cpp``, does the forward and every gradient in a single pass over the
rows, register-blocked over the few classes: the loss is a scalar, so its gradients are known in
the forward up to the upstream factor, which the backward applies (skipped when it is 1; Liger-
Kernel's fused linear cross-entropy also makes its gradients in the forward). ``hidden`` is read
once and its gradient written once: forward + backward 4.3 ms against the composition's 7.0 ms
(copy row, one thread, AVX-512, minimum CPU time on a loaded core; the loss alone 1.75 ms). Under
``torch.no_grad`` it computes the loss alone. The class-major torch composition below remains
the reference and the fallback (other devices, dtypes, more classes, no compiler).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.native import NativeExtension

_EXTENSION = NativeExtension(
    "rnnkit_lce", [Path(__file__).with_name("csrc") / "linear_cross_entropy.cpp"],
    extra_cflags=("-O3", "-fno-math-errno", "-fno-trapping-math"), wide_vectors=True,
    ops_namespace="rnnkit_lce",
)
FUSED_MAX_CLASSES = 16  # the operator pads the classes to 16 lanes (one AVX-512 float vector)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
                ) -> Tensor:
        # (V, N) logits: one GEMM with the long dimension N as the output's fast axis
        logits = weight @ hidden.t()
        if bias is not None:
            logits += bias.unsqueeze(1)
        # both vectorised along N; the softmax is saved for the backward (cheaper than exp of
        # the log-probabilities there: torch's exp over (V, N) takes ~4× its softmax)
        log_probs = torch.log_softmax(logits, dim=0)
        ctx.save_for_backward(hidden, weight, torch.softmax(logits, dim=0), targets)
        ctx.has_bias = bias is not None
        return -log_probs.gather(0, targets.unsqueeze(0)).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, probs, targets = ctx.saved_tensors
        # d loss / d logits = (softmax − one-hot) / N, class-major (V, N); out of place, so that
        # a second backward (retain_graph) finds the saved softmax intact
        scores = probs.scatter_add(0, targets.unsqueeze(0),
                                   torch.full((1, targets.numel()), -1.0, dtype=probs.dtype,
                                              device=probs.device))
        scores *= grad / targets.numel()
        grad_hidden = torch.mm(scores.t(), weight) if ctx.needs_input_grad[0] else None  # (N, H)
        grad_weight = scores @ hidden if ctx.needs_input_grad[1] else None  # (V, H), K = N
        grad_bias = scores.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def _fused_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                need_hidden: bool, need_params: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The C++ operator: (loss, its gradients w.r.t. hidden (empty unless asked), weight, bias)."""
    return torch.ops.rnnkit_lce.linear_cross_entropy(
        hidden.contiguous(), weight.contiguous(), _NO_BIAS if bias is None else bias.contiguous(),
        targets.contiguous(), need_hidden, need_params)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The C++ operator: gradients made in the forward, scaled by the upstream factor after."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                need_hidden: bool, need_params: bool) -> Tensor:
        loss, *grads = _fused_pass(hidden, weight, bias, targets, need_hidden, need_params)
        ctx.grads = grads
        ctx.flags = (need_hidden, need_params)
        if need_hidden or need_params:  # only for a second backward (retain_graph)
            ctx.save_for_backward(hidden, weight, bias, targets)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # the forward's gradients are handed over, not kept: autograd then owns them and may
        # accumulate into them (a leaf's .grad, a sum of branches) without a copy. A second
        # backward through the same graph recomputes them from the saved inputs.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            _, *grads = _fused_pass(*ctx.saved_tensors, *ctx.flags)
        if bool(grad != 1):  # a scaled loss (or a NaN factor reaching every gradient)
            for g in grads:
                g.mul_(grad)
        return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:3])),
                None, None, None)


_NO_BIAS = torch.empty(0)


def _fused(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the C++ operator can run these tensors (building it on first call)."""
    dtype = hidden.dtype
    return (hidden.device.type == "cpu" and dtype in (torch.float32, torch.float64)
            and weight.dtype == dtype and weight.device.type == "cpu"
            and (bias is None or (bias.dtype == dtype and bias.device.type == "cpu"))
            and 1 <= weight.shape[0] <= FUSED_MAX_CLASSES and _EXTENSION.load() is not None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         backend: str = "auto") -> Tensor:
    """Mean cross-entropy of ``hidden · weightᵀ + bias`` (N, V) against class ids ``targets``
    (N,): ``F.cross_entropy(F.linear(hidden, weight, bias), targets)``, by the C++ operator or
    class-major in torch (see the module docstring). No ignore index, weights or smoothing: every
    row counts. ``backend``: "auto" (the operator where it can run), "native" or "torch"."""
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be auto, native or torch, got {backend!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy needs hidden (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy needs targets ({hidden.shape[0]},), got "
                         f"{tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be class ids in [0, {weight.shape[0]}), got "
                         f"{int(targets.min())}..{int(targets.max())}")
    if backend != "torch" and _fused(hidden, weight, bias):
        # under torch.no_grad (evaluation) the pass computes the loss alone
        grad = torch.is_grad_enabled()
        need_hidden = grad and hidden.requires_grad
        need_params = grad and (weight.requires_grad or (bias is not None and bias.requires_grad))
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, need_hidden, need_params)
    if backend == "native":
        raise RuntimeError(f"the C++ linear_cross_entropy cannot run {hidden.dtype} on "
                           f"{hidden.device} with {weight.shape[0]} classes (CPU float32/float64, "
                           f"at most {FUSED_MAX_CLASSES}): {_EXTENSION.error or 'see above'}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)
