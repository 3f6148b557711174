"""The fused kernels' single-thread float32 GEMMs, at the shapes their loops call, per candidate.

Every product of ``fused_rnn.cpp`` goes through one single-thread GEMM (``gemm_rm``), chosen per
CPU at start-up (``choose_gemm``). This times each candidate on the products a layer of
(T, B, H) (input size H, G gate blocks) really makes, in one process, alternately, with the
thread's CPU time (``clock_gettime(CLOCK_THREAD_CPUTIME_ID)`` around the C++ loop), and prints
the best of the interleaved rounds:

- ``step fwd p128`` / ``p16``  h_{t-1} W_hh^T per step: M = B rows, N = G*H, K = H, W_hh^T in
  column panels of 128 / 16 (``RecW::mm_panels``, one call per panel; ``g_rec_panel``);
- ``step bwd`` / ``p16``  dh_{t-1} = dG_t W_hh per step: M = B, N = H, K = G*H, W_hh as stored
  / in 16-column panels (``BwdW::strips``);
- ``seq tile``  one tile of the whole-sequence products (``pgemm``: x W_ih^T, dx, the weight
  gradients): M = min(T*B, 256), N = min(G*H, 256), K = H in chunks of 256, B with row stride
  G*H;

for ``own`` (rnnkit's AVX2 register-blocked kernel, ``gemm_own``), ``brgemm`` (oneDNN's
micro-kernel that torch exports) and ``blas`` (the ``sgemm_`` of the BLAS torch links: MKL in
the CPU wheels), plus ``own`` with other K chunks / B packing (``--own-variants``). The peak
is NumPy's (OpenBLAS) 1024^3 product, same clock, same run.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/gemm_shapes.py --out /tmp/gemm.md
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rnnkit.engine.fused import _build

SHAPES = ["35,20,200", "100,32,256", "50,64,512"]
ROWS = [1, 2, 3, 4, 5, 6, 7, 8]  # small batches: the per-step products at B = 1..8


def peak_gflops(rounds: int) -> float:
    """NumPy's (OpenBLAS) 1024^3 float32 product, best of `rounds`, thread CPU time."""
    a = np.random.rand(1024, 1024).astype(np.float32)
    b = np.random.rand(1024, 1024).astype(np.float32)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        a @ b
        best = min(best, time.thread_time() - t0)
    return 2 * 1024**3 / best / 1e9


def panels(w_t: torch.Tensor, width: int) -> torch.Tensor:
    """W^T (K, N) in column panels of `width` (pack_panels' layout), flat."""
    return torch.cat([w_t[:, n0:n0 + width].contiguous().reshape(-1)
                      for n0 in range(0, w_t.size(1), width)])


def products(shape: str, gates: int) -> list[tuple[str, int, int, int, Callable]]:
    """(name, M, N, K, run(which, repeats) -> seconds) for the products of one layer shape."""
    ops = torch.ops.rnnkit_fused
    T, B, H = (int(v) for v in shape.split(","))
    GH = gates * H
    out = []

    def make(M: int, N: int, K: int, b: torch.Tensor, panel: int, kb: int = 0):
        a = torch.randn(M, K)
        c = torch.zeros(M, N)
        return lambda which, reps: ops.gemm_run(which, a, b, c, False, panel, kb, reps)

    w_t = torch.randn(H, GH)
    out.append(("step fwd p128", B, GH, H, make(B, GH, H, panels(w_t, 128), 128)))
    out.append(("step fwd p16", B, GH, H, make(B, GH, H, panels(w_t, 16), 16)))
    w = torch.randn(GH, H)
    out.append(("step bwd", B, H, GH, make(B, H, GH, w, 0)))
    out.append(("step bwd p16", B, H, GH, make(B, H, GH, panels(w, 16), 16)))
    M, N = min(T * B, 256), min(GH, 256)
    b_seq = torch.randn(H, GH)[:, :N]
    out.append(("seq tile", M, N, H, make(M, N, H, b_seq, 0, 256)))
    return out


def repeats_for(M: int, N: int, K: int) -> int:
    """Calls per timing: about 20 MFLOP, so one timing is well above the clock's resolution."""
    return max(1, int(2e7 / (2 * M * N * K)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="T,B,H (input size H)")
    p.add_argument("--rows", nargs="*", type=int, default=ROWS,
                   help="extra batch sizes for the per-step products (at each shape's H)")
    p.add_argument("--gates", type=int, default=4, help="gate blocks G (LSTM 4, GRU 3, RNN 1)")
    p.add_argument("--candidates", nargs="+", default=["own", "brgemm", "blas"])
    p.add_argument("--own-variants", nargs="*", default=["128:12", "512:12", "256:0", "0:0"],
                   help="extra own-kernel settings kc:pack_rows (kc 0: one chunk; pack_rows 0:"
                        " never pack B)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (min is kept)")
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(1)
    ops = _build.load()
    if ops is None:
        raise SystemExit(f"fused kernels unavailable: {_build.error()}")
    default = ops.set_gemm("auto")
    kc0, pack0 = ops.set_own_gemm(-1, -1)

    cands: list[tuple[str, str, tuple[int, int] | None]] = []  # (label, which, own setting)
    for which in args.candidates:
        try:
            ops.set_gemm(which)
        except RuntimeError:
            continue
        if ops.set_gemm(which) != which:
            continue  # not available on this build/CPU
        cands.append((which, which, (kc0, pack0) if which == "own" else None))
        if which == "own":
            for v in args.own_variants:
                kc, pr = (int(x) for x in v.split(":"))
                cands.append((f"own kc={kc or 'K'} pack>={pr or 'never'}", "own", (kc, pr)))
    ops.set_gemm("auto")

    rows: list[tuple[str, str, int, int, int, Callable]] = []
    for shape in args.shapes:
        for name, M, N, K, run in products(shape, args.gates):
            rows.append((shape, name, M, N, K, run))
        H = int(shape.split(",")[2])
        for b in args.rows:
            for name, M, N, K, run in products(f"1,{b},{H}", args.gates)[:4]:
                rows.append((f"B={b},H={H}", name, M, N, K, run))

    best = {(i, c[0]): float("inf") for i in range(len(rows)) for c in cands}
    peak = 0.0
    for _ in range(args.rounds):
        peak = max(peak, peak_gflops(3))
        for i, (_, _, M, N, K, run) in enumerate(rows):
            reps = repeats_for(M, N, K)
            for label, which, own in cands:
                if own is not None:
                    ops.set_own_gemm(*own)
                run(which, 1)  # warm: this candidate's first call after another's
                t = run(which, reps) / reps
                best[i, label] = min(best[i, label], t)
            ops.set_own_gemm(kc0, pack0)

    labels = [c[0] for c in cands]
    lines = [
        f"Single-thread float32 GEMM per call (µs, best of {args.rounds} interleaved rounds,"
        f" thread CPU time) and GFLOP/s; G = {args.gates}; default here: `{default}`;"
        f" peak (NumPy/OpenBLAS 1024^3, same run) {peak:.0f} GFLOP/s.",
        "",
        "| shape | product | M,N,K | " + " | ".join(labels) + " | best |",
        "|---|---|---|" + "---:|" * (len(labels) + 1),
    ]
    for i, (shape, name, M, N, K, _) in enumerate(rows):
        times = [best[i, lab] for lab in labels]
        cells = [f"{t * 1e6:.1f} ({2 * M * N * K / t / 1e9:.0f})" for t in times]
        lines.append(f"| {shape} | {name} | {M},{N},{K} | " + " | ".join(cells)
                     + f" | {labels[times.index(min(times))]} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
