"""The compile-on-first-use loader: a first build says so; `build_all` builds every extension."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnkit import native
from rnnkit.native import NativeExtension


def test_a_build_not_in_the_cache_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    extension = NativeExtension("rnnkit_test_announce", [source], openmp=False, isa=False)
    assert extension.load() is None and extension.error is not None  # a compile error never raises
    err = capsys.readouterr().err
    assert "rnnkit: compiling its C++ kernels (rnnkit_test_announce), once per machine" in err


def test_a_cached_build_is_not_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    extension = NativeExtension("rnnkit_test_cached", [tmp_path / "x.cpp"])
    assert not extension._cached("rnnkit_test_cached_0")
    (tmp_path / "rnnkit_test_cached_0").mkdir(exist_ok=True)
    (tmp_path / "rnnkit_test_cached_0" / "rnnkit_test_cached_0.so").write_bytes(b"")
    assert extension._cached("rnnkit_test_cached_0")


KERNELS = {"rnnkit_fused", "rnnkit_ctc", "rnnkit_scan", "rnnkit_ctc_decode", "rnnkit_layer_norm",
           "rnnkit_lce", "rnnkit_masks"}  # every compiled extension rnnkit builds


def test_build_all_reports_every_kernel_of_rnnkit() -> None:
    results = dict(native.build_all())
    assert set(results) == KERNELS
    if native.compiler_missing() is None:
        assert all(error is None for error in results.values()), results


def test_rnnkit_build_command(capsys: pytest.CaptureFixture[str]) -> None:
    from rnnkit.cli import main

    code = main(["build"])
    out = capsys.readouterr().out
    assert {line.split(":")[0] for line in out.splitlines()} == KERNELS
    assert code == (0 if native.compiler_missing() is None else 1)


# a fresh process whose first use of the fused kernels is inside torch.jit.trace (what the legacy
# torch.onnx.export(dynamo=False) runs), then once more outside it
_FIRST_LOAD_IN_A_JIT_TRACE = """
import torch
from rnnkit.engine.fused import _build

def forward(x):
    seen.append((not _build.EXTENSION._tried, _build.load() is not None))
    return x * 2

seen = []
traced = torch.jit.trace(forward, (torch.randn(2),))
first_load_here, loaded = seen[0]
print(first_load_here, loaded, _build.EXTENSION.error, traced.graph.findNode("rnnkit_fused::init") is None)
"""


def test_a_first_load_inside_a_jit_trace_loads_as_outside() -> None:
    """The first load runs the library's operators once (``init()``, a bool the tracer cannot
    record): inside a user's ``torch.jit.trace`` / legacy ONNX export it failed ("unsupported
    output type: bool") and every layer fell back to its pure-torch path for the process. The
    load now runs with the trace suspended: loaded, and nothing of it in the traced graph."""
    import os
    import subprocess
    import sys

    from rnnkit.engine.fused import _build

    if _build.load() is None:
        pytest.skip(f"fused kernels unavailable: {_build.error()}")
    result = subprocess.run([sys.executable, "-c", _FIRST_LOAD_IN_A_JIT_TRACE],
                            capture_output=True, text=True, env=os.environ, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True", "None", "True"]
