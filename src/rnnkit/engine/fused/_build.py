"""The fused C++ kernels as a :class:`~rnnkit.native.NativeExtension` (compiled on first use).

``load()`` returns ``torch.ops.rnnkit_fused`` (the operators, with their fake kernels and
autograd registered) or None; ``error()`` then says why (no compiler, no ninja, a compile error,
``RNNKIT_NO_NATIVE=1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rnnkit.engine.fused import _function
from rnnkit.native import NativeExtension


def _on_load(ops: Any) -> None:
    ops.init()  # resolve BLAS and probe the brgemm micro-kernel
    _function.register()


# -fno-trapping-math / -fno-math-errno: lets the compiler vectorise the exp/tanh loops and turn
# selects into blends; no result changes (only whether FP exception flags or errno are set).
EXTENSION = NativeExtension(
    "rnnkit_fused",
    [Path(__file__).with_name("csrc") / "fused_rnn.cpp"],
    extra_cflags=("-O3", "-fno-trapping-math", "-fno-math-errno"),
    wide_vectors=True,
    ops_namespace=_function.NAMESPACE,
    on_load=_on_load,
)


def load() -> Any:
    """``torch.ops.rnnkit_fused``, or None (see :func:`error`). Thread-safe, compiles once."""
    return EXTENSION.load()


def error() -> str | None:
    return EXTENSION.error
