"""Compile-on-first-use loader for the fused C++ kernels.

The extension is built with ``torch.utils.cpp_extension.load`` into torch's extension cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), so only the first use on a machine
pays the ~1 minute compile. Nothing is compiled at ``import rnnkit``. Any failure (no compiler,
no ninja, a compile error) is remembered as a short reason string instead of raised.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).with_name("csrc") / "fused_rnn.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_tried = False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_cflags() -> list[str]:
    """Vector ISA flags for the pointwise loops, chosen from what this CPU reports.

    The flags are part of the extension name, so a cache shared between different CPUs
    never loads a binary built for instructions the current one lacks.
    """
    flags = _cpu_flags()
    if {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma"} <= flags:
        # 16-wide exp/sigmoid/tanh: about half the pointwise time of AVX2
        avx512 = ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]
        return ["-mavx2", "-mfma", *avx512, "-mprefer-vector-width=512"]
    if {"avx2", "fma"} <= flags:
        return ["-mavx2", "-mfma"]
    return []


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return "compiler not found"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja not found"
    return None


def load() -> ModuleType | None:
    """The compiled extension, or None (see :func:`error`). Thread-safe, compiles once."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            reason = _compiler_missing()
            if reason is not None:
                _error = reason
                return None
            from torch.utils.cpp_extension import load as _load

            cflags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", *_isa_cflags()]
            tag = hashlib.sha1(" ".join(cflags).encode()).hexdigest()[:8]
            mod = _load(
                name=f"rnnkit_fused_{tag}",
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                verbose=bool(os.environ.get("RNNKIT_FUSED_VERBOSE")),
            )
            mod.init()
            _module = mod
        except Exception as exc:  # compile or load failure: report, never crash the caller
            _error = f"build failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
            _module = None
        finally:
            _tried = True
    return _module


def error() -> str | None:
    return _error
