"""The fused kernels' single-thread float32 GEMM (``gemm_rm``) against torch.mm, per candidate.

``gemm_run`` (a test/benchmark hook of the fused extension) runs C (+)= A B through the GEMM a
name selects; rnnkit's own AVX2 kernel (``gemm_own``) must match torch.mm over shapes that are
not multiples of its 6 x 16 tile or its K chunk, with acc on and off, strided operands,
panel-packed B, and NaN / inf where a GEMM that skipped zero operands would lose them.
"""

from __future__ import annotations

import pytest
import torch

from rnnkit.engine.fused import _build

ops = _build.load()
pytestmark = pytest.mark.skipif(ops is None, reason=f"fused kernels unavailable: {_build.error()}")


def available(which: str) -> bool:
    saved = ops.set_gemm("auto")
    try:
        return ops.set_gemm(which) == which
    finally:
        ops.set_gemm(saved)


CANDIDATES = [w for w in ("own", "brgemm", "blas") if ops is not None and available(w)]
SHAPES = [(1, 1, 1), (1, 17, 5), (5, 16, 7), (6, 16, 256), (7, 33, 300), (13, 9, 513),
          (12, 130, 64), (32, 128, 256), (20, 200, 800), (40, 250, 257)]


def run(which: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, acc: bool,
        panel: int = 0, kb: int = 0) -> None:
    ops.gemm_run(which, a, b, c, acc, panel, kb, 1)


def panels(b: torch.Tensor, width: int) -> torch.Tensor:
    """B (K, N) in column panels of `width`, flat (pack_panels' layout of B^T)."""
    return torch.cat([b[:, n0:n0 + width].contiguous().reshape(-1)
                      for n0 in range(0, b.size(1), width)])


@pytest.fixture(params=[(256, 12), (0, 0), (64, 1)], ids=["default", "one-chunk-no-pack", "kc64-pack"])
def own_setting(request):
    """gemm_own's K chunk and packing threshold (restored afterwards)."""
    saved = ops.set_own_gemm(*request.param)
    yield
    ops.set_own_gemm(*saved)


@pytest.mark.parametrize("which", CANDIDATES)
@pytest.mark.parametrize("acc", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_torch_mm(which, acc, shape, own_setting):
    M, N, K = shape
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    # strided A and C (row strides past the columns), B a column slice of a wider matrix
    a = torch.randn(M, K + 3, generator=g)[:, :K]
    b = torch.randn(K, N + 5, generator=g)[:, :N]
    c0 = torch.randn(M, N + 2, generator=g)
    c = c0.clone()
    run(which, a, b, c[:, :N], acc)
    want = torch.mm(a, b) + (c0[:, :N] if acc else 0)
    torch.testing.assert_close(c[:, :N], want, rtol=1e-5, atol=1e-4 * K**0.5)
    assert torch.equal(c[:, N:], c0[:, N:]), "wrote past the last column"


@pytest.mark.parametrize("which", CANDIDATES)
@pytest.mark.parametrize("panel", [16, 128])
@pytest.mark.parametrize("shape", [(3, 40, 9), (32, 1024, 256), (7, 200, 33)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gemm_panel_packed_b(which, panel, shape, own_setting):
    M, N, K = shape
    a, b = torch.randn(M, K), torch.randn(K, N)
    c = torch.full((M, N), float("nan"))  # acc off: C is not read
    run(which, a, b=panels(b, panel), c=c, acc=False, panel=panel)
    torch.testing.assert_close(c, torch.mm(a, b), rtol=1e-5, atol=1e-4 * K**0.5)


@pytest.mark.parametrize("which", CANDIDATES)
@pytest.mark.parametrize("shape", [(7, 19, 300), (32, 128, 256)], ids=lambda s: "x".join(map(str, s)))
def test_gemm_nonfinite_propagate(which, shape, own_setting):
    """inf times a zero gives NaN, inf alone gives inf, a NaN anywhere in a row / column spreads."""
    M, N, K = shape
    a, b = torch.randn(M, K), torch.randn(K, N)
    a[0, 3] = float("inf")
    b[3, :] = 0.0  # row 0: inf * 0 = NaN in every column
    a[2, 5] = float("nan")  # row 2: NaN everywhere
    b[7, 4] = float("inf")
    a[4:, 7] = 0.0  # rows 4.., column 4: 0 * inf = NaN
    a[1, 7] = 1.0  # row 1, column 4: + inf
    c = torch.zeros(M, N)
    run(which, a, b, c, acc=False)
    want = torch.mm(a, b)
    assert torch.equal(torch.isnan(c), torch.isnan(want))
    assert torch.equal(torch.isinf(c), torch.isinf(want))
    assert torch.isnan(c[0]).all() and torch.isnan(c[2]).all() and torch.isnan(c[4:, 4]).all()
    assert c[1, 4] == float("inf")


def test_auto_choice_follows_the_cpu():
    """AVX-512 CPUs keep oneDNN's brgemm; AVX2 ones without it take rnnkit's own kernel."""
    from rnnkit.native import cpu_flags

    flags = cpu_flags()
    chosen = ops.set_gemm("auto")
    if "avx512f" in flags:
        assert chosen != "own"
    elif {"avx2", "fma"} <= flags:
        assert chosen == "own"


def test_both_extensions_choose_the_same_float32_gemm():
    """The layer-normalised kernels' products follow the fused kernels' rule for the float32 GEMM
    (one choose_gemm, engine/csrc/blas.h): the two extensions never run different GEMMs on one
    CPU by accident."""
    from rnnkit.engine.fused import _layer_norm

    ln_ops = _layer_norm.load()
    if ln_ops is None:
        pytest.skip(f"layer-normalised kernels unavailable: {_layer_norm.EXTENSION.error}")
    assert ln_ops.gemm() == ops.set_gemm("auto")


@pytest.mark.parametrize("which", CANDIDATES)
@pytest.mark.parametrize("shape", [(3, 40, 9), (700, 800, 200), (300, 1030, 513)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gemm_input_projection_tiles(which, shape, own_setting):
    """panel = -16: the input projection's tile loop (pgemm_panels: 256-row tiles, K chunks of
    256, B in 16-column panels), as the inference path runs it and benchmarks/ort_gemm.py times it."""
    M, N, K = shape
    a, b = torch.randn(M, K), torch.randn(K, N)
    c = torch.full((M, N), float("nan"))
    run(which, a, b=panels(b, 16).view(K, N), c=c, acc=False, panel=-16)
    torch.testing.assert_close(c, torch.mm(a, b), rtol=1e-5, atol=1e-4 * K**0.5)
