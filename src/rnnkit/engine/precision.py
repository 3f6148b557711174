"""bfloat16 mixed precision: what ``torch.autocast("cpu", dtype=torch.bfloat16)`` does to a layer.

Under CPU autocast in bfloat16 every rnnkit recurrent layer (Elman, LSTM with peepholes and/or
coupled gates, GRU reset after and before) runs the fused kernel in its bf16 mode: each GEMM —
the input projection x W_ih^T, the per-step h_{t-1} W_hh^T, and in backward dG W_hh, dG W_ih,
X^T dG, H^T dG — reads bf16 copies of its operands (8-bit mantissa, rounded to nearest even)
and accumulates and writes float32. The cell state, the gates and every pointwise operation stay
float32; the parameters stay float32 (the master weights) and so do their gradients.

What comes out follows ``torch.nn`` under CPU autocast (torch 2.13, measured): ``nn.LSTM``
(autocast's ``mkldnn_rnn_layer``) and ``nn.RNN`` return output and final states in bfloat16,
``nn.GRU`` in float32. So rnnkit's ``RNN`` and ``LSTM`` (every variant) return bfloat16 and its
``GRU`` float32 (:func:`output_dtype`); gradients reach the float32 parameters either way. A
bfloat16 input or initial state is accepted (as by torch.nn) and read as float32 (exact). The
one-step cells (``LSTMCell`` & co.) run the same bf16 mode and keep their state float32 (unlike
``nn.LSTMCell``, which returns bf16 under autocast: a streamed state would be rounded every step).
The non-recurrent contrasts (MinGRU, MinLSTM, TCN) are torch ops, which autocast handles itself.

What has no bf16 path runs in float32 with autocast off and says so once (RuntimeWarning naming
it), never silently: the layer-normalised cells (their own kernel), the projected LSTM
(``proj_size``), the ``bptt`` and ``reference`` backends, and autocast in float16. A CPU without
bfloat16 instructions is refused with one line naming what is missing (:func:`require_bf16`).
"""

from __future__ import annotations

import warnings
from dataclasses import fields, is_dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from rnnkit import native

__all__ = ["autocast_bf16", "bf16_missing", "engine_autocast", "layer_autocast", "output_dtype",
           "require_bf16", "warn_float32"]

# CPU flags (Linux /proc/cpuinfo) with bfloat16 dot-product instructions: AVX-512 BF16 (Zen 4,
# Cooper Lake, Sapphire Rapids) or AMX-BF16 (Sapphire Rapids on).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> frozenset[str] | None:
    """This CPU's flags (:func:`rnnkit.native.cpu_flags`), or None where /proc/cpuinfo lists
    none (then the micro-kernel's own check decides)."""
    return frozenset(native.cpu_flags()) or None


@lru_cache(maxsize=1)
def bf16_missing() -> str | None:
    """None if this CPU and build run bf16 mode, else what is missing (one phrase)."""
    flags = cpu_flags()
    if flags is not None and not any(f in flags for f in BF16_FLAGS):
        return (f"this CPU has no bfloat16 instructions ({' or '.join(BF16_FLAGS)} not in "
                "/proc/cpuinfo)")
    from rnnkit.engine.fused import _build  # (compiles the kernels on first use)

    ops = _build.load()
    if ops is None:
        return f"the fused kernels are unavailable ({_build.error()})"
    if not ops.bf16_available():
        return "torch's oneDNN bf16 micro-kernel (cpublas::brgemm) is missing or failed its check"
    return None


def require_bf16() -> None:
    """Raises RuntimeError (one line) where bf16 mode cannot run."""
    missing = bf16_missing()
    if missing is not None:
        raise RuntimeError(f"rnnkit: bfloat16 mixed precision needs a CPU with bfloat16 "
                           f"instructions: {missing}")


def autocast_bf16(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether CPU autocast in bfloat16 applies to a tensor of ``dtype`` on ``device`` (autocast
    lowers float32 only: float64 stays float64)."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def autocast_other(device: torch.device) -> torch.dtype | None:
    """The CPU autocast dtype when autocast is on in a dtype rnnkit has no mode for (float16)."""
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    return None if dtype == torch.bfloat16 else dtype


def describe(spec: Any) -> str:
    """A variant in words, e.g. ``lstm (projection, layer_norm)``: the fields off their default."""
    if not is_dataclass(spec):
        return str(spec)
    changed = [f.name if f.default is False else f"{f.name}={getattr(spec, f.name)}"
               for f in fields(spec) if f.name != "kind" and getattr(spec, f.name) != f.default]
    return spec.kind + (f" ({', '.join(changed)})" if changed else "")


def output_dtype(kind: str) -> torch.dtype:
    """The dtype a layer of this cell kind returns under bf16 autocast (torch.nn's choice)."""
    return torch.float32 if kind == "gru" else torch.bfloat16


_warned: set[str] = set()


def warn_float32(what: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Once per ``what``: it runs in float32 although autocast asked for ``dtype``."""
    if what in _warned:
        return
    _warned.add(what)
    name = str(dtype).removeprefix("torch.")
    warnings.warn(f"rnnkit: {what} has no {name} mixed-precision path; it runs in float32 "
                  "under this autocast", RuntimeWarning, stacklevel=4)


def layer_autocast(input: Any, hx: Any, dtype: torch.dtype, kind: str
                   ) -> tuple[Any, Any, torch.dtype | None]:
    """A layer's view of CPU autocast: ``(input, hx, out_dtype)``.

    Outside autocast (or for float64 parameters, which autocast leaves alone) everything passes
    through and ``out_dtype`` is None. Under it, an input or initial state in a lower precision
    is read in the parameters' dtype (exact: bf16 and fp16 are subsets of float32) and
    ``out_dtype`` is what the layer returns: :func:`output_dtype` under bf16 (after
    :func:`require_bf16`), None (float32, as computed) under float16.
    """
    if dtype != torch.float32:
        return input, hx, None
    device = (input.data if isinstance(input, PackedSequence) else input).device
    if not torch.is_autocast_enabled("cpu") or device.type != "cpu":
        return input, hx, None
    low = torch.get_autocast_dtype("cpu")
    if low == torch.bfloat16:
        require_bf16()

    def read(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, Tensor) and t.dtype == low else t

    if isinstance(input, PackedSequence):
        input = input._replace(data=read(input.data))
    else:
        input = read(input)
    hx = tuple(read(t) for t in hx) if isinstance(hx, (tuple, list)) else read(hx)
    return input, hx, output_dtype(kind) if low == torch.bfloat16 else None


def engine_autocast(math: Any, backend: str, x: Tensor) -> str | None:
    """How the engine runs one layer under CPU autocast: ``"bf16"`` (the fused kernel's bf16
    mode), ``"float32"`` (no mixed-precision path: warned once, autocast switched off) or None
    (no autocast, or a float64 layer, which autocast leaves alone)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not torch.is_autocast_enabled("cpu"):
        return None
    low = torch.get_autocast_dtype("cpu")
    spec = getattr(math, "spec", None)
    if low != torch.bfloat16:
        warn_float32("every rnnkit recurrent layer", low)
        return "float32"
    if backend != "fused":
        warn_float32(f"the {backend!r} backend")
        return "float32"
    from rnnkit.engine.fused import route_of  # (the one table from variant to path)

    if route_of(math, bf16=True) != "kernel":
        warn_float32(f"the {describe(spec)} (no bfloat16 kernel)")
        return "float32"
    return "bf16"
