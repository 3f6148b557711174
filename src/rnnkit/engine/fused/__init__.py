"""Fused CPU backend: a whole layer's time loop in C++ (compiled on first use).

Seam used by the engine::

    unavailable_reason(spec, dtype, device) -> str | None
    run_layer(spec, x, state0, params, batch_sizes) -> (outputs, final_state)
    run_step(spec, x_t, state, params) -> new_state | None      (inference only)

``spec`` is a cell math object (its ``spec``, a :class:`~rnnkit.cells.CellSpec`) or a CellSpec;
``_function.KERNELS`` maps each variant to its kernel and an unknown one raises. ``x`` is
(T, B, I); ``state0`` is ``(h0,)`` or ``(h0, c0)``; ``params`` is
``(w_ih, w_hh, b_ih | None, b_hh | None, *peephole)``; ``batch_sizes`` is None or T non-increasing
ints (active rows are the prefix; inactive rows keep their state and output 0).

The kernels are torch operators (``torch.ops.rnnkit_fused``, see ``_function``), so
``torch.compile``, ``torch.export`` and ``torch.library.opcheck`` see one operator per layer and
direction. They (``csrc/fused_rnn.cpp``) run the time loop inside one OpenMP region: each thread
owns a slice of hidden units, computes its columns of the recurrent GEMM with the oneDNN brgemm
micro-kernel that torch exports, updates its units, and meets the others at one barrier per step.
The input projection, ``dx`` and the weight gradients are single parallel GEMMs over all steps.

The layer-normalised LSTM and GRU have their own kernels (``csrc/layer_norm_rnn.cpp``, see
``_layer_norm``): a row's LN needs every column of the row, so there threads split the batch.

The standard torch forms with torch's own fused kernel (plain LSTM, which torch runs through
oneDNN's RNN primitive) dispatch to ``torch._VF`` instead: it is the same math and the fastest
code on CPU for that case. See ``benchmarks/fused_kernels.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rnnkit.engine.fused import _build, _function, _layer_norm
from rnnkit.engine.fused._function import config_of, peephole_weights, run

__all__ = ["run_layer", "run_step", "unavailable_reason"]

# Dispatch the plain LSTM to torch's own fused op (see native_op). Benchmarks turn it off to
# compare rnnkit's kernel on the same case.
use_native = True


def unavailable_reason(spec: Any, dtype: torch.dtype, device: torch.device | str) -> str | None:
    """None if the fused path can run ``spec`` for this dtype and device, else a short reason."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"device {device.type}"
    if dtype not in (torch.float32, torch.float64):
        return f"dtype {str(dtype).removeprefix('torch.')}"
    if getattr(spec, "layer_norm", False):  # their own kernels (issue 12): _layer_norm.KERNELS
        if _function.spec_of(spec) not in _layer_norm.KERNELS:
            return f"no fused kernel for {_function.spec_of(spec)}"
        if _layer_norm.load() is None:
            return _layer_norm.EXTENSION.error or "extension unavailable"
        return None
    try:
        config_of(spec)
    except ValueError as exc:
        return str(exc)
    if _build.load() is None and native_op(spec) is None:
        return _build.error() or "extension unavailable"
    return None  # (without the extension the plain LSTM still runs through torch's op)


def run_layer(
    spec: Any,
    x: Tensor,
    state0: Sequence[Tensor],
    params: Sequence[Tensor | None],
    batch_sizes: Sequence[int] | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Runs one layer in one direction; differentiable w.r.t. x, state0 and every param."""
    if getattr(spec, "layer_norm", False):  # (x is already LN(x W_ih^T): see engine.run_layer)
        if _layer_norm.load() is None:
            raise RuntimeError(f"fused backend unavailable: {_layer_norm.EXTENSION.error}")
        return _layer_norm.run(_function.spec_of(spec), x, state0, params, batch_sizes)
    native = native_op(spec, x, params[1].shape[1] if params[1] is not None else None)
    if native is not None:
        return native(x, state0, params, batch_sizes)
    if _build.load() is None:
        raise RuntimeError(f"fused backend unavailable: {_build.error()}")
    cfg = config_of(spec)
    bs = None if batch_sizes is None else [int(b) for b in batch_sizes]
    if bs is not None and all(b == x.shape[1] for b in bs):
        bs = None
    # Save activations only when a gradient will be asked for.
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *state0, *params))
    return run(cfg, bs, x, state0, params, training)


def run_step(
    spec: Any, x: Tensor, state: Sequence[Tensor], params: Sequence[Tensor | None]
) -> tuple[Tensor, ...] | None:
    """One streaming step (B, I) through the ``step`` operator, forward only; None where it
    cannot run (no kernel, dtype, device), so the caller takes the layer path.

    The short path matters: at batch 1 most of a step's time is per-call overhead, so the
    variant's kernel config is looked up once per cell math object and nothing else is checked.
    """
    if getattr(spec, "layer_norm", False):
        return None  # (the layer path: its input LN lives in engine.run_layer)
    cfg = getattr(spec, "_fused_step_config", None)
    if cfg is None:
        if unavailable_reason(spec, x.dtype, x.device) is not None or _build.load() is None:
            return None
        cfg = config_of(spec)
        spec._fused_step_config = cfg
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    h, c = torch.ops.rnnkit_fused.step(*cfg.args(), x, state[0], state[1] if cfg.kind == 1 else None,
                                       params[0], params[1], params[2], params[3],
                                       peephole_weights(cfg, params), _function.loop_threads)
    return (h, c) if cfg.kind == 1 else (h,)


# ---- torch's own fused op for the plain LSTM -----------------------------------------------------


# torch's LSTM reorders its weights on every call (~0.7 ms at H=256) and pays a fixed cost per
# step: where the per-step GEMM is small rnnkit's kernel is faster. Measured on the 2-core CI
# machine kind, 2 threads, times relative to nn.LSTM (forward / forward+backward), rnnkit's
# kernel: T,B,H = 200,1,64: 0.91 / 0.69; 200,4,64: 0.79 / 0.67; 200,1,96: 0.55 / 0.47;
# 200,1,128: 0.72 / 0.63; 35,20,64: 0.95 / 0.85; 100,32,64: 0.83 / 0.97 — but 200,1,256: 1.61 /
# 1.33; 35,20,128: 1.07 / 1.06; 35,20,200: 1.11 / 1.27 (torch's op through rnnkit: 0.96–1.03).
NATIVE_MIN_ROWS = 32


def own_kernel_faster(steps: int, batch: int, hidden: int) -> bool:
    """Whether rnnkit's kernel beats torch's oneDNN op on a plain LSTM of this shape."""
    return (steps * batch < NATIVE_MIN_ROWS or (batch <= 4 and hidden <= 128)
            or (batch <= 32 and hidden <= 64))


def native_op(spec: Any, x: Tensor | None = None, hidden: int | None = None):
    """torch._VF runner when ``spec`` is exactly a torch.nn form and torch's kernel is fastest.

    Only the plain LSTM qualifies: torch runs it through oneDNN's fused RNN primitive. torch's
    GRU and Elman RNN are per-step ATen loops that rnnkit's kernel beats (see the benchmark).
    Given the input ``x`` (T, B, I) and the hidden size, small problems stay with rnnkit's kernel.
    """
    if not (use_native and spec.kind == "lstm" and not spec.peephole and not spec.coupled
            and not getattr(spec, "layer_norm", False)):  # (spec-like objects may lack it)
        return None
    if (x is not None and hidden is not None and own_kernel_faster(x.shape[0], x.shape[1], hidden)
            and _build.load() is not None):
        return None
    return _run_vf_lstm


def _run_vf_lstm(
    x: Tensor,
    state0: Sequence[Tensor],
    params: Sequence[Tensor | None],
    batch_sizes: Sequence[int] | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    w_ih, w_hh, b_ih, b_hh = params[:4]
    has_bias = b_ih is not None
    weights = [w_ih, w_hh, b_ih, b_hh] if has_bias else [w_ih, w_hh]
    h0, c0 = (s.unsqueeze(0) for s in state0)
    steps, batch = x.shape[:2]
    if batch_sizes is None or all(b == batch for b in batch_sizes):
        out, h, c = torch._VF.lstm(x, (h0, c0), weights, has_bias, 1, 0.0, False, False, False)
        return out, (h[0], c[0])
    bs = [int(b) for b in batch_sizes]
    lengths = [sum(b > i for b in bs) for i in range(batch)]
    live = sum(1 for n in lengths if n > 0)
    if live == 0:
        return x.new_zeros(steps, batch, w_hh.shape[1]), tuple(state0)
    packed, bs_t = torch._VF._pack_padded_sequence(x[:, :live], torch.tensor(lengths[:live]), False)
    out_p, h, c = torch._VF.lstm(
        packed, bs_t, (h0[:, :live], c0[:, :live]), weights, has_bias, 1, 0.0, False, False
    )
    out, _ = torch._VF._pad_packed_sequence(out_p, bs_t, False, 0.0, steps)
    if live < batch:
        out = torch.cat((out, out.new_zeros(steps, batch - live, out.shape[2])), 1)
    h, c = h[0], c[0]
    if live < batch:  # rows that never ran keep their initial state
        h = torch.cat((h, state0[0][live:]))
        c = torch.cat((c, state0[1][live:]))
    return out, (h, c)
