"""onnxruntime's GEMM (MLAS) against rnnkit's (gemm_own) on the 4-gate LSTM's two products.

An LSTM layer of (T, B, H) (input size H) makes two kinds of product: the input projection of
all steps, x (T*B, H) @ W_ih^T (H, 4H), and per step h (B, H) @ W_hh^T (H, 4H). onnxruntime's
LSTM runs both through MLAS with the weights packed once per session; here each is one ONNX
MatMul node with B a constant initializer (which onnxruntime prepacks the same way), timed
against rnnkit's products as its inference path runs them: the projection in pgemm_panels'
tiles over W_ih^T in 16-column panels (``gemm_run`` with panel -16), the step over W_hh^T in
16-column panels (``RecW::mm_panels``, panel 16). MLAS's time is the session's minus that of
the same graph of Identity nodes (its per-run cost); a step model holds ``--nodes`` MatMul
nodes on the same input so that cost is small against the products, and rnnkit's step is timed
over as many products per call (both sides start each timing with caches the other evicted).
Interleaved rounds, 1 thread, thread CPU time, best of ``--rounds``.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/ort_gemm.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gemm_shapes import panels
from rnnkit.engine.fused import _build

SHAPES = ["35,20,200", "100,32,256", "50,64,512"]


def matmul_session(rows: int, k: int, w: np.ndarray | None, nodes: int):
    """A session of `nodes` MatMul nodes X (rows, k) @ W (W None: Identity nodes), 1 thread."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])
    graph_nodes, outputs = [], []
    for i in range(nodes):
        graph_nodes.append(helper.make_node("MatMul", ["X", "W"], [f"Y{i}"]) if w is not None
                           else helper.make_node("Identity", ["X"], [f"Y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None))
    init = [numpy_helper.from_array(w, "W")] if w is not None else []
    model = helper.make_model(helper.make_graph(graph_nodes, "g", [x], outputs, init),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def run_seconds(session, feed: dict[str, np.ndarray]) -> float:
    """One session.run's thread CPU time."""
    t0 = time.thread_time()
    session.run(None, feed)
    return time.thread_time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="T,B,H (input size H)")
    p.add_argument("--rounds", type=int, default=40, help="interleaved rounds (min is kept)")
    p.add_argument("--nodes", type=int, default=20, help="MatMul nodes of a step model")
    args = p.parse_args()
    torch.set_num_threads(1)
    ops = _build.load()
    if ops is None:
        raise SystemExit(f"fused kernels unavailable: {_build.error()}")
    print("| T,B,H | product | M,N,K | MLAS µs (GFLOP/s) | rnnkit µs (GFLOP/s) | rnnkit / MLAS |")
    print("|---|---|---|---:|---:|---:|")
    for shape in args.shapes:
        T, B, H = (int(v) for v in shape.split(","))
        N = 4 * H
        for name, M, panel, nodes in [("projection", T * B, -16, 1), ("step", B, 16, args.nodes)]:
            w = (np.random.randn(H, N) * 0.05).astype(np.float32)
            x = np.random.randn(M, H).astype(np.float32)
            feed = {"X": x}
            with_matmul = matmul_session(M, H, w, nodes)
            identity = matmul_session(M, H, None, nodes)
            a, c = torch.from_numpy(x), torch.zeros(M, N)
            b = panels(torch.from_numpy(w), 16)
            b = b.view(H, N) if panel < 0 else b
            reps = nodes  # (as many products per timing on both sides: the first one's cold
            # caches weigh the same)
            best = [float("inf")] * 3
            for _ in range(args.rounds):
                best[0] = min(best[0], run_seconds(with_matmul, feed))
                best[1] = min(best[1], run_seconds(identity, feed))
                best[2] = min(best[2], ops.gemm_run("own", a, b, c, False, panel, 0, reps) / reps)
            mlas, own = (best[0] - best[1]) / nodes, best[2]
            flop = 2 * M * N * H
            print(f"| {shape} | {name} | {M},{N},{H} | {mlas * 1e6:.1f} ({flop / mlas / 1e9:.0f})"
                  f" | {own * 1e6:.1f} ({flop / own / 1e9:.0f}) | {own / mlas:.2f} |", flush=True)


if __name__ == "__main__":
    main()
