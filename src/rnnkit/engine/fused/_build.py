"""The fused C++ kernels as a :class:`~rnnkit.native.NativeExtension` (compiled on first use).

``load()`` returns the pybind11 module or None; ``error()`` then says why (no compiler, no
ninja, a compile error, ``RNNKIT_NO_NATIVE=1``).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from rnnkit.native import NativeExtension

# -fno-trapping-math / -fno-math-errno: lets the compiler vectorise the exp/tanh loops and turn
# selects into blends; no result changes (only whether FP exception flags or errno are set).
EXTENSION = NativeExtension(
    "rnnkit_fused",
    [Path(__file__).with_name("csrc") / "fused_rnn.cpp"],
    extra_cflags=("-O3", "-fno-trapping-math", "-fno-math-errno"),
    wide_vectors=True,
    on_load=lambda module: module.init(),
)


def load() -> ModuleType | None:
    """The compiled extension, or None (see :func:`error`). Thread-safe, compiles once."""
    return EXTENSION.load()


def error() -> str | None:
    return EXTENSION.error
