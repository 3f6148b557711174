"""Compile-on-first-use loading of rnnkit's C++ kernels, shared by every native component.

A :class:`NativeExtension` names one C++ source (or a few) and its flags. The first
:meth:`~NativeExtension.load` builds it with ``torch.utils.cpp_extension.load`` into torch's
extension cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), so a machine pays
the compile once; later processes only ``dlopen`` the cached library. Nothing is compiled at
``import rnnkit``: constructing a :class:`NativeExtension` is free.

A failure (no compiler, no ninja, a compile error, ``RNNKIT_NO_NATIVE=1``) never raises: ``load``
returns None and :attr:`~NativeExtension.error` holds a one-line reason, so each caller can fall
back to its pure-torch path and say why.

Two kinds of extension are supported:

* a pybind11 module (``ops_namespace=None``): ``load`` returns the Python module;
* an operator library registered with ``TORCH_LIBRARY(ns, m)`` (``ops_namespace="ns"``): the
  source then needs only ATen headers, not ``torch/extension.h``, which roughly halves the
  compile time, and ``load`` returns ``torch.ops.ns``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Set to 1 to keep every native kernel off (e.g. to test or time the pure-torch fallbacks).
DISABLE_ENV = "RNNKIT_NO_NATIVE"
# Set to 1 to see the compiler's command lines and output.
VERBOSE_ENV = "RNNKIT_NATIVE_VERBOSE"


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing this call (no tensor data to read, no
    Python side effects that the graph would not replay): the one test of it in rnnkit."""
    return torch.compiler.is_compiling()


def cpu_flags() -> set[str]:
    """The feature flags this CPU reports in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_cflags(wide: bool = False) -> list[str]:
    """Vector ISA flags chosen from what this CPU reports.

    ``wide`` adds AVX-512 where the CPU has it: 16-wide exp/sigmoid/tanh take about half the
    time of AVX2 in the fused RNN's pointwise loops. The flags are hashed into the extension name
    (see :meth:`NativeExtension.load`), so a cache shared between different CPUs never loads a
    binary built for instructions one of them lacks.
    """
    flags = cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return []
    avx512 = ("avx512f", "avx512dq", "avx512bw", "avx512vl")
    if wide and set(avx512) <= flags:
        return ["-mavx2", "-mfma", *(f"-m{name}" for name in avx512), "-mprefer-vector-width=512"]
    return ["-mavx2", "-mfma"]


def compiler_missing() -> str | None:
    """Why nothing can be compiled here, or None if a C++ compiler and ninja are present."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"C++ compiler {cxx.split()[0]!r} not found"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja not found"
    return None


# rnnkit's C++ extensions: the module that declares each, and its name there
_KERNEL_MODULES = {"rnnkit.engine.fused._build": "EXTENSION", "rnnkit.losses.ctc": "_EXTENSION",
                   "rnnkit.engine.scan": "_EXTENSION", "rnnkit.decoding.ctc": "_EXTENSION"}
_KERNEL_MODULES["rnnkit.engine.fused._layer_norm"] = "EXTENSION"  # the layer-normalised cells
_KERNEL_MODULES["rnnkit.losses.cross_entropy"] = "_EXTENSION"  # output layer + loss, few classes
_KERNEL_MODULES["rnnkit.engine.regularise"] = "_EXTENSION"  # the regularisers' masks


def build_all() -> list[tuple[str, str | None]]:
    """Builds (or loads from the cache) every C++ extension: ``(name, None or why it failed)``.

    ``rnnkit build`` calls it, so that the one-time compile happens at install time rather than
    in the middle of a user's first run."""
    import importlib

    extensions = [getattr(importlib.import_module(module), attribute)
                  for module, attribute in _KERNEL_MODULES.items()]
    return [(extension.name, None if extension.load() is not None else extension.error)
            for extension in extensions]


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


class NativeExtension:
    """One C++ extension, built and loaded at most once per process (thread-safe).

    ``name`` is a stem: the flags' hash is appended, so changing flags never reuses a stale build.
    ``on_load`` runs once on the loaded module (e.g. a self-check); if it raises, the extension
    counts as unavailable with that reason.
    """

    def __init__(
        self,
        name: str,
        sources: Sequence[str | os.PathLike[str]],
        *,
        extra_cflags: Sequence[str] = ("-O3",),
        extra_ldflags: Sequence[str] = (),
        openmp: bool = True,
        isa: bool = True,
        wide_vectors: bool = False,
        ops_namespace: str | None = None,
        on_load: Callable[[Any], None] | None = None,
    ) -> None:
        self.name = name
        self.sources = [str(Path(source)) for source in sources]
        self.extra_cflags = list(extra_cflags)
        self.extra_ldflags = list(extra_ldflags)
        self.openmp = openmp
        self.isa = isa
        self.wide_vectors = wide_vectors
        self.ops_namespace = ops_namespace
        self.on_load = on_load
        self._lock = threading.Lock()
        self._module: Any = None
        self._error: str | None = None
        self._tried = False
        self._fallback_warned = False

    @property
    def error(self) -> str | None:
        """Why :meth:`load` returned None (None before the first load and after a success)."""
        return self._error

    def cflags(self) -> list[str]:
        """Compiler flags: the extra ones, OpenMP (at::parallel_for is inline OpenMP code), ISA."""
        return [*self.extra_cflags, *(["-fopenmp"] if self.openmp else []),
                *(isa_cflags(self.wide_vectors) if self.isa else [])]

    def unavailable_reason(self) -> str | None:
        """None if the extension is usable (building it on first call), else why it is not."""
        return None if self.load() is not None else (self._error or "unavailable")

    def load_for(self, backend: str, kernel: str, fallback: str) -> Any:
        """:meth:`load` for a call whose ``backend`` is "native" (the kernel or an error naming
        ``kernel`` and why it is unavailable) or "auto" (the kernel, or None and one warning per
        process that ``fallback`` runs instead)."""
        ops = self.load()
        if ops is None:
            if backend == "native":
                raise RuntimeError(f"{kernel} is unavailable: {self._error}")
            if not self._fallback_warned:
                self._fallback_warned = True
                warnings.warn(f"{kernel} is unavailable ({self._error}); using {fallback}",
                              RuntimeWarning, stacklevel=4)
        return ops

    def load(self) -> Any:
        """The built module (or ``torch.ops.<ops_namespace>``), or None; compiles on first use."""
        if self._tried:
            return self._module
        if tracing():  # first use inside a trace: build outside of it
            _load_while_tracing(self)
            return self._module
        with _jit_trace_suspended():
            return self._load_once()

    def _load_once(self) -> Any:
        with self._lock:
            if not self._tried:
                try:
                    self._module = self._build()
                except Exception as exc:  # a build or load failure must not crash the caller
                    self._module, self._error = None, f"build failed: {_last_line(exc)}"
                finally:
                    self._tried = True
        return self._module

    def _cached(self, name: str) -> bool:
        """True when torch's extension cache already holds a build of ``name`` for these sources
        (torch then only loads it, or rebuilds silently in seconds after a source edit)."""
        from torch.utils.cpp_extension import _get_build_directory

        try:
            directory = Path(_get_build_directory(name, verbose=False))
        except Exception:  # an unwritable cache: the build itself will say what is wrong
            return False
        return any(directory.glob("*.so"))

    def _build(self) -> Any:
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            self._error = f"disabled by {DISABLE_ENV}"
            return None
        reason = compiler_missing()
        if reason is not None:
            self._error = reason
            return None
        from torch.utils.cpp_extension import load as _load

        cflags = self.cflags()
        ldflags = [*self.extra_ldflags, *(["-fopenmp"] if self.openmp else [])]
        tag = hashlib.sha1(" ".join([*cflags, "|", *ldflags]).encode()).hexdigest()[:8]
        name = f"{self.name}_{tag}"
        if not self._cached(name):
            # the first build takes 30–70 s: say so, or the run seems to hang
            print(f"rnnkit: compiling its C++ kernels ({self.name}), once per machine: about a "
                  f"minute (`rnnkit build` does it ahead of time)", file=sys.stderr, flush=True)
        result = _load(
            name=name,
            sources=self.sources,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            is_python_module=self.ops_namespace is None,
            verbose=os.environ.get(VERBOSE_ENV, "") not in ("", "0"),
        )
        module = result if self.ops_namespace is None else getattr(torch.ops, self.ops_namespace)
        if self.on_load is not None:
            self.on_load(module)
        return module


@contextlib.contextmanager
def _jit_trace_suspended() -> Iterator[None]:
    """Nothing run inside is recorded by an active ``torch.jit.trace`` (the legacy
    ``torch.onnx.export(dynamo=False)`` traces with it): loading an extension runs its operators
    once (``on_load``: ``init()`` returns a bool, which the tracer cannot record, so the first load
    inside a user's trace failed and the layers fell back to their pure-torch path)."""
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


_BUILTINS: dict[str, Callable[..., Any]] = {}


def builtin_operator(qualified_name: str) -> Callable[..., Any]:
    """The C++ entry of operator ``"namespace::name"`` (its default overload), looked up once per
    process: ``OpOverload.__call__`` is one Python frame more per call, and its ``_op`` is the
    builtin it forwards to. For the per-step calls of streaming and cell steps, where that frame
    is a measurable share of a few-µs step; the operator's library must be loaded."""
    op = _BUILTINS.get(qualified_name)
    if op is None:
        namespace, name = qualified_name.split("::")
        op = _BUILTINS[qualified_name] = getattr(getattr(torch.ops, namespace), name).default._op
    return op


@torch.compiler.assume_constant_result
def _load_while_tracing(extension: NativeExtension) -> bool:
    """``extension.load()`` run by torch.compile / torch.export as plain Python (they cannot
    trace its lock); a first call of a layer inside ``torch.compile`` then builds the kernels."""
    return extension._load_once() is not None


def first_derivative_only(operator: str, message: str) -> None:
    """Registers an autograd kernel for a hand-written backward ``operator`` that raises
    ``message`` if anything differentiates through it.

    Without one, torch treats the outputs of a C++ backward as constants under
    ``create_graph=True``: a double backward (gradient penalties, Hessian-vector products) would
    be silently zero. A ``create_graph=True`` whose result is not differentiated again still
    works; only the second differentiation raises.
    """
    def no_second_derivative(ctx: Any, *grads: torch.Tensor) -> None:
        raise RuntimeError(message)

    torch.library.register_autograd(operator, no_second_derivative,
                                    setup_context=lambda ctx, inputs, output: None)

