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
tensor and autograd differentiates it.

That form is what a GPU wants (depth O(log T)). On the CPU the B·H columns already give every
core plenty of independent work, and the log-space form costs a dozen transcendental passes over
(T, B, H) plus as many in its backward. So where it can, a layer of minGRU / minLSTM runs one
small C++ operator instead (``csrc/scan.cpp``, ``torch.ops.rnnkit_scan.minimal_scan``, its
hand-derived backward registered as its autograd): the gates and the recurrence in one pass that
walks time once per batch row. The log-space scan is the fallback (no compiler, another device);
both are tested against the step-by-step reference. For narrow inputs (:data:`PROJECTED_MAX_INPUTS`)
:func:`minimal_layer` also moves ``x W_ihᵀ + b_ih`` into the operator
(``minimal_scan_projected``), so that no (T, B, G·H) tensor is written at all; when every row
of such an input is one-hot (symbols fed without an embedding, as copy memory's) the gates depend
on the symbol alone and the operator reads them from a per-symbol table made once per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.native import NativeExtension, first_derivative_only

if TYPE_CHECKING:
    from rnnkit.cells.minimal import MinimalMath

BACKENDS = ("auto", "native", "log")
_NO_LENGTHS = torch.empty(0, dtype=torch.long)


def _register(ops: Any) -> None:
    """Shape propagation and autograd of the C++ operator (once, when it is first loaded)."""

    @torch.library.register_fake("rnnkit_scan::minimal_scan")
    def _(gx: Tensor, h0: Tensor, lengths: Tensor, kind: int) -> Tensor:
        return gx.new_empty(gx.shape[0], gx.shape[1], h0.shape[1])

    @torch.library.register_fake("rnnkit_scan::minimal_scan_backward")
    def _(grad: Tensor, gx: Tensor, h: Tensor, h0: Tensor, lengths: Tensor, kind: int
          ) -> tuple[Tensor, Tensor]:
        return torch.empty_like(gx), torch.empty_like(h0)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        gx, h0, lengths, kind = inputs
        ctx.save_for_backward(gx, output, h0, lengths)
        ctx.kind = kind

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        gx, h, h0, lengths = ctx.saved_tensors
        grad_gx, grad_h0 = ops.minimal_scan_backward(grad.contiguous(), gx, h, h0, lengths, ctx.kind)
        return grad_gx, grad_h0, None, None

    torch.library.register_autograd("rnnkit_scan::minimal_scan", backward, setup_context=setup_context)

    @torch.library.register_fake("rnnkit_scan::minimal_scan_projected")
    def _(x: Tensor, weight_t: Tensor, bias: Tensor, h0: Tensor, lengths: Tensor, kind: int) -> Tensor:
        return x.new_empty(x.shape[0], x.shape[1], h0.shape[1])

    @torch.library.register_fake("rnnkit_scan::minimal_scan_projected_backward")
    def _(grad: Tensor, x: Tensor, weight_t: Tensor, bias: Tensor, h: Tensor, h0: Tensor, lengths: Tensor,
          kind: int, input_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        grad_x = torch.empty_like(x) if input_grad else x.new_empty(0)
        return grad_x, torch.empty_like(weight_t), torch.empty_like(bias), torch.empty_like(h0)

    def setup_projected(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight_t, bias, h0, lengths, kind = inputs
        ctx.save_for_backward(x, weight_t, bias, output, h0, lengths)
        ctx.kind = kind

    def backward_projected(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight_t, bias, h, h0, lengths = ctx.saved_tensors
        grad_x, grad_weight_t, grad_bias, grad_h0 = ops.minimal_scan_projected_backward(
            grad.contiguous(), x, weight_t, bias, h, h0, lengths, ctx.kind, ctx.needs_input_grad[0])
        return (grad_x if ctx.needs_input_grad[0] else None), grad_weight_t, grad_bias, grad_h0, None, None

    torch.library.register_autograd("rnnkit_scan::minimal_scan_projected", backward_projected,
                                    setup_context=setup_projected)

    # the backward operators have no derivative of their own: a double backward raises
    for op in ("minimal_scan_backward", "minimal_scan_projected_backward"):
        first_derivative_only(
            f"rnnkit_scan::{op}",
            "minGRU/minLSTM's C++ backward is not twice differentiable (a double backward, "
            "create_graph=True differentiated again); backend='log' runs plain torch ops that are")


_EXTENSION = NativeExtension(
    "rnnkit_scan", [Path(__file__).with_name("csrc") / "scan.cpp"],
    extra_cflags=("-O3", "-fno-math-errno", "-fno-trapping-math"), wide_vectors=True,
    ops_namespace="rnnkit_scan", on_load=_register,
)


def native_scan_available(x: Tensor) -> bool:
    """True when the C++ operator can run ``x`` (CPU float32/float64; builds it on first call)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and _EXTENSION.load() is not None)


def _running(steps: int, lengths: Tensor, device: torch.device) -> Tensor:
    """(T, B, 1) bool: True where step t is within row b's length."""
    t = torch.arange(steps, device=device).unsqueeze(1)  # (T, 1)
    return (t < lengths.to(device).unsqueeze(0)).unsqueeze(2)


# Inputs this narrow go through the fused projection (csrc/scan.cpp, minimal_scan_projected):
# below about 16 input features a GEMM with K = I runs far below the BLAS's peak and the
# (T, B, G·H) tensor it writes costs more than forming each row's gates where they are used.
PROJECTED_MAX_INPUTS = 16


def minimal_layer(math: MinimalMath, x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor,
                  lengths: Tensor | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One layer and direction of a minimal cell from its input ``x`` (T, B, I) and ``W_ih``, ``b_ih``.

    Narrow inputs (I ≤ :data:`PROJECTED_MAX_INPUTS`) on the C++ path run the projection and the
    scan as one operator; otherwise ``gx = x W_ihᵀ + b_ih`` is one GEMM for all gates and
    :func:`minimal_layer_scan` runs the recurrence. Returns ``(outputs (T, B, H), h_final (B, H))``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    narrow = x.shape[-1] <= PROJECTED_MAX_INPUTS and x.shape[0] > 0
    if narrow and backend != "log" and native_scan_available(x):
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        h = torch.ops.rnnkit_scan.minimal_scan_projected(
            x.contiguous(), weight.t().contiguous(), bias.contiguous(), h0.contiguous(),
            _NO_LENGTHS if lengths is None else lengths.contiguous(), math.kernel_kind)
        final = h[-1]
        if lengths is not None:
            h = h * _running(h.shape[0], lengths, h.device)
        return h, final
    return minimal_layer_scan(math, F.linear(x, weight, bias), h0, lengths, backend)


def minimal_layer_scan(math: MinimalMath, gx: Tensor, h0: Tensor, lengths: Tensor | None = None,
                       backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One layer of a minimal cell over all steps from ``gx = W_ih x + b_ih`` (T, B, G·H).

    Returns ``(outputs (T, B, H), h_final (B, H))`` with the lengths convention of
    :func:`log_space_scan`. ``backend``: "native" (the C++ operator), "log" (the log-space scan)
    or "auto" (native where it can run).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    native = backend == "native" or (backend == "auto" and native_scan_available(gx))
    if not native:
        log_a, log_b = math.coefficients(gx)
        return log_space_scan(log_a, log_b, h0, lengths)
    if not native_scan_available(gx):
        raise RuntimeError(f"the C++ scan cannot run here: {_EXTENSION.error or gx.device}")
    if gx.shape[0] == 0:
        return gx.new_zeros(0, *h0.shape), h0
    h = torch.ops.rnnkit_scan.minimal_scan(
        gx.contiguous(), h0.contiguous(), _NO_LENGTHS if lengths is None else lengths.contiguous(),
        math.kernel_kind)
    final = h[-1]
    if lengths is not None:
        h = h * _running(h.shape[0], lengths, h.device)
    return h, final


def log_space_scan(
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
        running = _running(log_a.shape[0], lengths, log_a.device)
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
