r"""Connectionist temporal classification (Graves et al. 2006): the loss and its gradient by hand.

The target ``l`` of length S is extended with blanks to ``l'`` = (blank, l_1, blank, …, l_S, blank)
of length 2S+1. With emissions ``y_t(k) = log p_t(k)``, the forward variable is

.. math::

    α_t(s) = y_t(l'_s) + \log\sum \{α_{t-1}(s), α_{t-1}(s-1), α_{t-1}(s-2)\ \text{if}\ l'_s ≠
    \text{blank and}\ l'_s ≠ l'_{s-2}\}

and the loss is ``−log(α_{T-1}(2S) + α_{T-1}(2S−1))``. The backward variable β is the forward
variable of the same problem reversed in time and in label order, so one recursion serves both:
the two run together as one batch of 2N rows.

The gradient returned for ``log_probs`` is the one ``torch.nn.functional.ctc_loss`` returns,
``exp(y_t(k)) − exp(log Σ_{s: l'_s = k} α_t(s) β_t(s) + nll − y_t(k))``: for log-softmax inputs, which
is what CTC takes, backpropagating it through the log-softmax gives the exact gradient w.r.t. the
logits, and it is what torch users' code expects.

Two implementations compute it. ``csrc/ctc.cpp`` is a C++ kernel (one sample per thread, both
recursions and the gradient in one pass over the data), compiled on first use with
``torch.utils.cpp_extension`` (about 15 s, once per machine: torch caches the build); it is what
``ctc_loss`` runs on CPU float32 / float64 tensors. The pure-torch code in this file is the
reference the kernel is tested against, and the fallback where the kernel cannot be built (with a
one-time warning saying why) or cannot run (other devices and dtypes). ``backend="python"`` /
``"native"`` pick one explicitly.

NaN and ±inf in ``log_probs`` give what ``F.ctc_loss`` gives, in the loss and in every gradient
entry: both implementations combine log-probabilities with the operations of torch's kernel
(a maximum that keeps its first operand unless another is strictly greater, inf - inf = NaN),
and ``zero_infinity`` replaces a +inf loss only, so a NaN from a diverging model stays visible.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.native import NativeExtension
from rnnkit.validation import integer_values

REDUCTIONS = ("none", "mean", "sum")
BACKENDS = ("auto", "native", "python")

# -ffp-contract=off: the kernel fuses multiply-adds only where it says so, so its vectorised loops
# and their scalar remainders round alike and results never depend on how a loop was split.
# -fno-trapping-math: lets the compiler turn the kernel's selects into blends and so vectorise
# its exp / log loops; it changes no result (only whether FP exception flags may be raised).
_EXTENSION = NativeExtension(
    "rnnkit_ctc",
    [Path(__file__).with_name("csrc") / "ctc.cpp"],
    extra_cflags=("-O3", "-ffp-contract=off", "-fno-trapping-math"),
    ops_namespace="rnnkit_ctc",
)


def native_unavailable_reason() -> str | None:
    """None if the C++ kernel is usable (building it on first call), else why it is not."""
    return _EXTENSION.unavailable_reason()


def _native_ops(log_probs: Tensor, backend: str) -> Any | None:
    """``torch.ops.rnnkit_ctc`` if ``backend`` and the inputs allow the kernel, else None."""
    if backend == "python":
        return None
    if log_probs.device.type != "cpu" or log_probs.dtype not in (torch.float32, torch.float64):
        if backend == "native":
            raise ValueError(f"the native CTC kernel runs CPU float32/float64 tensors, got "
                             f"{log_probs.dtype} on {log_probs.device}")
        return None
    return _EXTENSION.load_for(backend, "rnnkit.losses.ctc_loss's native CTC kernel",
                               "the slower pure-torch implementation")


def _padded_targets(targets: Tensor, target_lengths: Tensor) -> Tensor:
    """(N, S_max) labels, whether ``targets`` came padded (N, S) or concatenated (sum S_n,)."""
    if targets.dim() == 2:
        return targets.long()
    batch = target_lengths.numel()
    width = int(target_lengths.max()) if batch else 0
    padded = targets.new_zeros(batch, max(width, 1), dtype=torch.long)
    # label j of the concatenation belongs to sample rows[j], at position j - offset of that row
    rows = torch.repeat_interleave(torch.arange(batch), target_lengths)
    offsets = torch.cumsum(target_lengths, 0) - target_lengths
    positions = torch.arange(rows.numel()) - offsets[rows]
    padded[rows, positions] = targets.long().to(padded.device)
    return padded


def _check(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
           blank: int, reduction: str) -> None:
    """Every check of the arguments, for both backends: an error naming the problem, never a
    traceback from inside either implementation or a loss computed from a wrong reading."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if log_probs.dim() != 3:
        raise ValueError(
            f"log_probs must be (T, N, C) log-probabilities, got shape {tuple(log_probs.shape)}"
        )
    if not log_probs.is_floating_point():
        raise TypeError(f"log_probs must be floating point, got {log_probs.dtype}")
    if log_probs.numel() == 0:
        raise ValueError(f"log_probs is empty (shape {tuple(log_probs.shape)}): CTC needs at "
                         "least one frame, one sample and one class (as torch's ctc_loss)")
    steps, batch, classes = log_probs.shape
    if not 0 <= blank < classes:
        raise ValueError(f"blank index {blank} is outside the {classes} classes of log_probs")
    for name, lengths in (("input_lengths", input_lengths), ("target_lengths", target_lengths)):
        if lengths.shape != (batch,):
            raise ValueError(
                f"{name} must have one entry per sample ({batch}), got shape {tuple(lengths.shape)}"
            )
        negative = (lengths < 0).nonzero().flatten()
        if negative.numel():
            n = int(negative[0])
            raise ValueError(f"{name}[{n}] = {int(lengths[n])} is negative")
    if int(input_lengths.max()) > steps:
        n = int(input_lengths.argmax())
        raise ValueError(
            f"input_lengths[{n}] = {int(input_lengths[n])} exceeds the {steps} frames of log_probs"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class labels, got dtype {targets.dtype}")
    if targets.dim() == 2:
        if targets.shape[0] != batch or int(target_lengths.max()) > targets.shape[1]:
            raise ValueError(
                f"padded targets {tuple(targets.shape)} do not hold target_lengths up to "
                f"{int(target_lengths.max())} for {batch} samples"
            )
    elif targets.dim() == 1:
        if targets.numel() != int(target_lengths.sum()):
            raise ValueError(
                f"concatenated targets hold {targets.numel()} labels but target_lengths sum to "
                f"{int(target_lengths.sum())}"
            )
    else:
        raise ValueError(f"targets must be (N, S) or concatenated (sum S_n,), got "
                         f"{tuple(targets.shape)}")
    labels = _padded_targets(targets.cpu(), target_lengths)
    inside = torch.arange(labels.shape[1]).unsqueeze(0) < target_lengths.unsqueeze(1)
    for problem, wrong in (
        (f"outside the {classes} classes", (labels < 0) | (labels >= classes)),
        (f"the blank ({blank}), which a target must not contain", labels == blank),
    ):
        where = (wrong & inside).nonzero()
        if where.numel():
            n, i = (int(v) for v in where[0])
            raise ValueError(f"target label {int(labels[n, i])} of sample {n} at position {i} is "
                             f"{problem}")


def minimum_input_lengths(labels: Tensor, target_lengths: Tensor) -> Tensor:
    """Frames an alignment needs: one per label plus one blank between each repeated pair."""
    repeats = (labels[:, 1:] == labels[:, :-1]) if labels.shape[1] > 1 else labels[:, :0].bool()
    positions = torch.arange(repeats.shape[1]).unsqueeze(0) + 1
    repeats = repeats & (positions < target_lengths.unsqueeze(1))
    return target_lengths + repeats.sum(1)


def _log_add3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """log(e^a + e^b + e^c) with the arithmetic of torch's CPU kernel (LossCTC.cpp): the first
    operand starts the maximum and only a strictly greater one replaces it, an all -inf maximum
    becomes 0. So NaN and ±inf give exactly what they give in torch (``torch.logsumexp`` treats
    +inf differently: it returns +inf where torch's CTC makes NaN of inf - inf)."""
    m = torch.where(b > a, b, a)
    m = torch.where(c > m, c, m)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    return torch.log(torch.exp(a - m) + torch.exp(b - m) + torch.exp(c - m)) + m


def _log_add2(a: Tensor, b: Tensor) -> Tensor:
    """log(e^a + e^b), as torch's kernel forms it (``std::max(a, b)`` keeps a unless a < b)."""
    m = torch.where(a < b, b, a)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    return torch.log(torch.exp(a - m) + torch.exp(b - m)) + m


def _forward_variables(emit: Tensor, skip_allowed: Tensor) -> Tensor:
    """α for every frame: emit (T, R, L') log-emissions, skip_allowed (R, L') → (T, R, L')."""
    steps, rows, width = emit.shape
    impossible = emit.new_full((rows, 2), float("-inf"))
    no_skip = torch.full_like(skip_allowed, float("-inf"), dtype=emit.dtype)
    alpha = emit.new_empty(steps, rows, width)
    # frame 0 may only be in l'_0 or l'_1 (set, not summed: a NaN emission of a state that
    # cannot be reached yet must not become a NaN α, as in torch)
    first = torch.arange(width) < 2
    previous = torch.where(first, emit[0], torch.full_like(emit[0], float("-inf")))
    alpha[0] = previous
    for t in range(1, steps):
        stay = previous
        advance = torch.cat((impossible[:, :1], previous[:, :-1]), dim=1)
        skip = torch.cat((impossible, previous[:, :-2]), dim=1)[:, :width]
        skip = torch.where(skip_allowed, skip, no_skip)
        previous = _log_add3(stay, advance, skip) + emit[t]
        alpha[t] = previous
    return alpha


def _skip_allowed(extended: Tensor, blank: int) -> Tensor:
    """Where α may come from two labels back: a label that differs from the label before it."""
    two_back = torch.cat((torch.full_like(extended[:, :2], blank), extended[:, :-2]), dim=1)
    return (extended != blank) & (extended != two_back)


def _reverse_rows(values: Tensor, lengths: Tensor, dim: int, batch_dim: int) -> Tensor:
    """Reverses the first ``lengths[n]`` entries along ``dim`` of each batch row ``n``."""
    size = values.shape[dim]
    position = torch.arange(size).view([size if d == dim else 1 for d in range(values.dim())])
    length = lengths.view([lengths.numel() if d == batch_dim else 1 for d in range(values.dim())])
    source = torch.where(position < length, length - 1 - position, position)
    return values.gather(dim, source.expand_as(values))


class _SecondDerivativeRaises(torch.autograd.Function):
    """The identity on a gradient, tied to the ``log_probs`` it was made from: differentiating
    it again raises, as torch's ``_ctc_loss_backward`` does. (The gradient is made in the
    forward, so autograd would otherwise take it for a constant: a silently zero or partial
    second derivative.)"""

    @staticmethod
    def forward(ctx: Any, grad: Tensor, log_probs: Tensor) -> Tensor:
        return grad.clone()

    @staticmethod
    def backward(ctx: Any, *_: Tensor) -> None:
        raise RuntimeError("the CTC loss is not twice differentiable (as torch's "
                           "F.ctc_loss): its gradient was differentiated again")


def _first_derivative_only(grad: Tensor, log_probs: Tensor) -> Tensor:
    # grad mode is on in a backward only under create_graph=True
    return _SecondDerivativeRaises.apply(grad, log_probs) if torch.is_grad_enabled() else grad


class _CTC(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, log_probs: Tensor, labels: Tensor, input_lengths: Tensor,
                target_lengths: Tensor, blank: int, zero_infinity: bool) -> Tensor:
        steps, batch, classes = log_probs.shape
        width = 2 * labels.shape[1] + 1
        extended = labels.new_full((batch, width), blank)
        extended[:, 1::2] = labels
        ext_lengths = 2 * target_lengths + 1
        inside = torch.arange(width).unsqueeze(0) < ext_lengths.unsqueeze(1)  # (N, L')
        reversed_extended = _reverse_rows(extended, ext_lengths, 1, 0)

        emit = log_probs.gather(2, extended.unsqueeze(0).expand(steps, batch, width))
        emit = emit.masked_fill(~inside.unsqueeze(0), float("-inf"))
        frames = torch.arange(steps).view(steps, 1, 1)
        emit = emit.masked_fill(frames >= input_lengths.view(1, batch, 1), float("-inf"))
        # β is α of the problem reversed in time (within each input) and in label order
        reversed_emit = _reverse_rows(_reverse_rows(emit, input_lengths, 0, 1), ext_lengths, 2, 1)
        skip_allowed = _skip_allowed(torch.cat((extended, reversed_extended)), blank)
        both = _forward_variables(torch.cat((emit, reversed_emit), 1), skip_allowed)
        alpha = both[:, :batch]
        beta = _reverse_rows(_reverse_rows(both[:, batch:], ext_lengths, 2, 1), input_lengths, 0, 1)

        last = (input_lengths - 1).clamp(min=0)
        final = alpha[last, torch.arange(batch)]  # (N, L')
        ends = torch.stack((ext_lengths - 1, (ext_lengths - 2).clamp(min=0)), 1)
        end_values = final.gather(1, ends)
        nll = torch.where(target_lengths > 0, -_log_add2(end_values[:, 0], end_values[:, 1]),
                          -end_values[:, 0])
        nll = torch.where(input_lengths > 0, nll, torch.where(
            target_lengths > 0, torch.full_like(nll, float("inf")), torch.zeros_like(nll)))

        # log Σ_{s: l'_s = k} α_t(s) β_t(s), summed in log space state by state (from the last
        # state down, as torch does, so that NaN and inf combine as they do there); at a
        # sample's last frame only its two end states count
        log_alpha_beta = alpha + beta  # (T, N, L')
        states = torch.arange(width).view(1, 1, width)
        last_frame = frames == (input_lengths - 1).view(1, batch, 1)
        counted = inside.unsqueeze(0) & ((frames < (input_lengths - 1).view(1, batch, 1))
                                         | (last_frame & (states >= (ext_lengths - 2).view(1, batch, 1))))
        log_collected = log_probs.new_full((steps, batch, classes), float("-inf"))
        for s in reversed(range(width)):
            index = extended[:, s].view(1, batch, 1).expand(steps, batch, 1)
            current = log_collected.gather(2, index).squeeze(2)
            value = log_alpha_beta[:, :, s]
            added = torch.where(current == float("-inf"), value, _log_add2(current, value))
            log_collected.scatter_(2, index, torch.where(counted[:, :, s], added, current)
                                   .unsqueeze(2))
        grad = log_probs.exp() - (log_collected + nll.view(1, batch, 1) - log_probs).exp()
        grad = grad.masked_fill(frames >= input_lengths.view(1, batch, 1), 0.0)
        if zero_infinity:  # torch's zero_infinity replaces +inf only: NaN stays visible
            infinite = nll == float("inf")
            nll = torch.where(infinite, torch.zeros_like(nll), nll)
            grad = grad.masked_fill(infinite.view(1, batch, 1), 0.0)
        ctx.save_for_backward(grad, log_probs)
        return nll

    @staticmethod
    def backward(ctx: Any, d_nll: Tensor) -> tuple[Tensor | None, ...]:
        grad, log_probs = ctx.saved_tensors
        return _first_derivative_only(grad * d_nll.view(1, -1, 1), log_probs), None, None, None, None, None


class _NativeCTC(torch.autograd.Function):
    """The C++ kernel: nll and (when log_probs needs one) its gradient, in one call."""

    @staticmethod
    def forward(ctx: Any, log_probs: Tensor, targets: Tensor, input_lengths: Tensor,
                target_lengths: Tensor, blank: int, zero_infinity: bool, ops: Any,
                need_grad: bool) -> Tensor:
        # need_grad comes from the caller: inside forward grad mode is always off, and
        # ctx.needs_input_grad is True even under torch.no_grad(), where the work would be wasted
        nll, grad = ops.ctc(log_probs, targets, input_lengths, target_lengths, blank,
                            zero_infinity, need_grad)
        ctx.save_for_backward(grad, log_probs)
        return nll

    @staticmethod
    def backward(ctx: Any, d_nll: Tensor) -> tuple[Tensor | None, ...]:
        grad, log_probs = ctx.saved_tensors
        return (_first_derivative_only(grad * d_nll.view(1, -1, 1), log_probs),
                None, None, None, None, None, None, None)


def _raise_if_unalignable(labels: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> None:
    needed = minimum_input_lengths(labels, target_lengths)
    short = (input_lengths < needed).nonzero().flatten()
    if short.numel():
        n = int(short[0])
        raise ValueError(
            f"CTC cannot align sample {n}: its input length is {int(input_lengths[n])} frames "
            f"but its {int(target_lengths[n])} labels need at least {int(needed[n])} (one frame "
            "per label plus a blank between repeated labels); shorten the target, lengthen "
            "the input, or pass zero_infinity=True to give such samples zero loss"
        )


def ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor | list[int] | tuple[int, ...],
    target_lengths: Tensor | list[int] | tuple[int, ...],
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """The CTC loss with the signature and semantics of ``torch.nn.functional.ctc_loss``.

    ``log_probs`` (T, N, C) are log-softmax outputs; ``targets`` are padded (N, S) or concatenated
    (sum of target_lengths,). ``reduction="mean"`` divides each loss by its target length and
    averages over the batch, as torch does. Where a target cannot be aligned at all (its input is
    shorter than its labels plus one blank per repeated pair) this raises an error naming the
    sample, unless ``zero_infinity=True``, which makes that sample's loss and gradient zero.

    ``backend``: ``"auto"`` runs the C++ kernel where it can (building it on first use) and the
    pure-torch reference otherwise; ``"native"`` insists on the kernel (an error if it cannot run);
    ``"python"`` runs the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in (("log_probs", log_probs), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if isinstance(blank, bool) or not hasattr(blank, "__index__"):
        raise TypeError(f"blank must be an int, got {type(blank).__name__}")
    blank = operator.index(blank)  # (a NumPy integer becomes an int)
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs = log_probs.unsqueeze(1)
        targets = targets.unsqueeze(0) if targets.dim() == 1 else targets
    input_lengths = integer_values("input_lengths", input_lengths).reshape(-1)
    target_lengths = integer_values("target_lengths", target_lengths).reshape(-1)
    _check(log_probs, targets, input_lengths, target_lengths, blank, reduction)
    ops = _native_ops(log_probs, backend)
    if ops is not None:
        # the kernel reads padded and concatenated targets alike; an unalignable sample comes
        # back as an infinite loss (or NaN, from NaN inputs), and only then is it worth looking
        # for one to name
        need_grad = torch.is_grad_enabled() and log_probs.requires_grad
        nll = _NativeCTC.apply(log_probs, targets.long(), input_lengths, target_lengths, blank,
                               zero_infinity, ops, need_grad)
        if not zero_infinity and not bool(torch.isfinite(nll).all()):
            _raise_if_unalignable(_padded_targets(targets, target_lengths), input_lengths,
                                  target_lengths)
    else:
        labels = _padded_targets(targets, target_lengths)
        labels = labels * (torch.arange(labels.shape[1]).unsqueeze(0) < target_lengths.unsqueeze(1))
        if not zero_infinity:
            _raise_if_unalignable(labels, input_lengths, target_lengths)
        nll = _CTC.apply(log_probs, labels, input_lengths, target_lengths, blank, zero_infinity)
    if reduction == "none":
        return nll.squeeze(0) if unbatched else nll
    if reduction == "sum":
        return nll.sum()
    return (nll / target_lengths.clamp(min=1).to(nll.dtype)).mean()


class CTCLoss(nn.Module):
    """Module form of :func:`ctc_loss`, as ``torch.nn.CTCLoss``."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.blank = blank
        self.reduction = reduction
        self.zero_infinity = zero_infinity
        self.backend = backend

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths: Any,
                target_lengths: Any) -> Tensor:
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank,
                        self.reduction, self.zero_infinity, backend=self.backend)
