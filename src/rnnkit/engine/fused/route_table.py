"""Measured routes of the plain LSTM: rnnkit's kernel or torch's oneDNN op, per CPU.

Which of the two is faster depends on the CPU (vector width, caches), the thread count and the
shape, so a rule measured on one CPU is wrong on another: the built-in rules of
``fused.own_kernel_faster`` were measured on an AVX-512 CPU, and on a Zen 3 (AVX2) CPU with one
thread they send inference at 50,64,512 to rnnkit's kernel, 1.57x slower there than torch's op.

``benchmarks/routing.py`` times both paths over a grid of shapes (T, B, H) per mode
(``inference``: forward without gradient; ``training``: forward+backward) and thread count, and
writes ``routes/<isa>.json`` beside this file. A file holds, per thread count, the machine facts
and for each mode and grid point the times and ``ratio`` = rnnkit's kernel / torch's op.

Decision (:func:`own_faster`): the ratio at the grid point nearest to (T, B, H) in log space
(squared distance ``Σ (ln v − ln g)²`` over T, B, H: twice the steps counts as much as twice the
batch; ties go to the smaller point), rnnkit's kernel where it is < 1. No interpolation: the
route is one measured comparison, and the same shape always takes the same path on one machine.

None (the built-in rules apply, unchanged) where this CPU's ISA key has no table or its table no
entry for the thread count. A table that cannot be read or does not have this format is ignored
with one warning line (once per process), never an exception in a user's forward.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rnnkit import native

__all__ = ["FORMAT", "MODES", "ROUTES_DIR", "RouteTable", "active", "isa_key", "own_faster",
           "parse", "using"]

ROUTES_DIR = Path(__file__).parent / "routes"
FORMAT = 1
MODES = ("inference", "training")


def isa_key() -> str:
    """This CPU's key: torch's kernel capability (``torch.backends.cpu.get_cpu_capability()``,
    what its oneDNN op runs with: "avx2", "avx512", "default", ...), "avx512_bf16" where the CPU
    also has AVX-512 BF16 (the CPUs the built-in rules were measured on), lower case."""
    key = torch.backends.cpu.get_cpu_capability().lower()
    if key == "avx512" and "avx512_bf16" in native.cpu_flags():
        return "avx512_bf16"
    return key


@dataclass(frozen=True)
class RouteTable:
    """One ISA's measurements: ``points[(threads, mode)]`` is a tuple of (T, B, H, ratio)."""

    isa: str
    points: dict[tuple[int, str], tuple[tuple[int, int, int, float], ...]]
    _memo: dict[tuple[int, int, int, int, str], bool] = field(default_factory=dict, compare=False)

    def own_faster(self, steps: int, batch: int, hidden: int, threads: int,
                   inference: bool) -> bool | None:
        """Whether the nearest measured point has rnnkit's kernel faster; None without points
        for this thread count and mode."""
        mode = MODES[0] if inference else MODES[1]
        key = (steps, batch, hidden, threads, mode)
        known = self._memo.get(key)  # (a layer forward asks once per call: µs matter at batch 1)
        if known is not None:
            return known
        points = self.points.get((threads, mode))
        if not points:
            return None
        here = (math.log(max(steps, 1)), math.log(max(batch, 1)), math.log(max(hidden, 1)))
        nearest = min(points, key=lambda p: (
            sum((a - math.log(b)) ** 2 for a, b in zip(here, p[:3])), p[:3]))
        if len(self._memo) > 4096:  # (shapes vary per batch with bucketing: keep it bounded)
            self._memo.clear()
        faster = self._memo[key] = nearest[3] < 1.0  # (not read back: another thread may clear)
        return faster


def parse(text: str) -> RouteTable:
    """The table in ``text`` (a routes/<isa>.json file); ValueError saying what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a routing table of format {FORMAT}")
    isa, by_threads = data.get("isa"), data.get("threads")
    if not isinstance(isa, str) or not isinstance(by_threads, dict):
        raise ValueError("no 'isa' string or 'threads' object")
    points: dict[tuple[int, str], tuple[tuple[int, int, int, float], ...]] = {}
    for threads, entry in by_threads.items():
        if not threads.isdigit() or int(threads) < 1 or not isinstance(entry, dict):
            raise ValueError(f"threads {threads!r}: not a positive count with an object")
        for mode in MODES:
            rows = entry.get(mode, {})
            if not isinstance(rows, dict):
                raise ValueError(f"threads {threads}, {mode}: not an object")
            found = []
            for shape, row in rows.items():
                sizes = shape.split(",")
                ratio = row.get("ratio") if isinstance(row, dict) else None
                if (len(sizes) != 3 or not all(s.isdigit() and int(s) > 0 for s in sizes)
                        or type(ratio) not in (int, float) or not 0 < ratio < math.inf):
                    raise ValueError(f"threads {threads}, {mode}, {shape!r}: not 'T,B,H' with a "
                                     "positive 'ratio'")
                found.append((*(int(s) for s in sizes), float(ratio)))
            if found:
                points[(int(threads), mode)] = tuple(sorted(found))
    return RouteTable(isa, points)


_UNSET = object()
_active: RouteTable | object | None = _UNSET


def _load(isa: str, directory: Path | None = None) -> RouteTable | None:
    """``isa``'s table in ``directory`` (default ROUTES_DIR); None, with one warning where the
    file is there but unusable."""
    path = (directory or ROUTES_DIR) / f"{isa}.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None  # (no measurement for this ISA: the built-in rules)
    except (OSError, UnicodeDecodeError) as exc:  # (a byte that is not UTF-8: a ValueError)
        reason = str(exc)
    else:
        try:
            table = parse(text)
            if table.isa != isa:
                raise ValueError(f"its isa is {table.isa!r}")
            return table
        except ValueError as exc:
            reason = str(exc)
    warnings.warn(f"rnnkit: ignoring the routing table {path} ({reason}); the plain LSTM "
                  "takes the built-in routing rules", RuntimeWarning, stacklevel=2)
    return None


def active() -> RouteTable | None:
    """This CPU's table, read on first use (None: the built-in rules)."""
    global _active
    if _active is _UNSET:
        _active = _load(isa_key())
    return _active  # type: ignore[return-value]


@torch.compiler.assume_constant_result  # (torch.compile: a constant of the traced shape)
def own_faster(steps: int, batch: int, hidden: int, threads: int, inference: bool) -> bool | None:
    """The measured route of a padded plain LSTM on this CPU (see the module docstring): True
    rnnkit's kernel, False torch's op, None not measured here."""
    table = active() if _active is _UNSET else _active  # (a call less: asked on every forward)
    if table is None:
        return None
    return table.own_faster(steps, batch, hidden, threads, inference)  # type: ignore[union-attr]


@contextlib.contextmanager
def using(table: RouteTable | None) -> Iterator[None]:
    """The table ``table`` (None: none, the built-in rules) in place of this CPU's, for tests."""
    global _active
    previous = _active
    _active = table
    try:
        yield
    finally:
        _active = previous
