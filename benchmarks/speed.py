"""The speed referee: every rnnkit cell variant against the torch.nn module of its family.

For each variant and shape (T, B, H) it times forward-only and forward+backward of one layer
(input size = H), alternating rnnkit and torch.nn runs in the same process so that both see the
same machine state, and reports median times, the ratio rnnkit / torch.nn, and the achieved GEMM
rate against a large square ``torch.mm`` measured in the same run. It also times one streaming step
at batch 1 against ``torch.nn.LSTMCell``/``GRUCell``/``RNNCell``.

    python benchmarks/speed.py                       # full table, writes docs/performance.md + PNG
    python benchmarks/speed.py --quick               # one small shape, a few repeats
    python benchmarks/speed.py --variants lstm gru_before --shapes 35,20,200
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import rnnkit
from rnnkit.engine import fused, get_default_backend, threads
from timing import interleaved

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section

# name -> (rnnkit constructor, torch.nn family constructor, gate blocks, rnnkit cell, torch cell)
VARIANTS: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module], int,
                          Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "rnn_tanh": (lambda i, h, **k: rnnkit.RNN(i, h, **k), lambda i, h: nn.RNN(i, h), 1,
                 lambda i, h: rnnkit.RNNCell(i, h), lambda i, h: nn.RNNCell(i, h)),
    "rnn_sigmoid": (lambda i, h, **k: rnnkit.RNN(i, h, nonlinearity="sigmoid", **k),
                    lambda i, h: nn.RNN(i, h), 1,
                    lambda i, h: rnnkit.RNNCell(i, h, nonlinearity="sigmoid"),
                    lambda i, h: nn.RNNCell(i, h)),
    "lstm": (lambda i, h, **k: rnnkit.LSTM(i, h, **k), lambda i, h: nn.LSTM(i, h), 4,
             lambda i, h: rnnkit.LSTMCell(i, h), lambda i, h: nn.LSTMCell(i, h)),
    "lstm_peephole": (lambda i, h, **k: rnnkit.LSTM(i, h, peephole=True, **k),
                      lambda i, h: nn.LSTM(i, h), 4,
                      lambda i, h: rnnkit.LSTMCell(i, h, peephole=True),
                      lambda i, h: nn.LSTMCell(i, h)),
    "lstm_coupled": (lambda i, h, **k: rnnkit.LSTM(i, h, coupled=True, **k),
                     lambda i, h: nn.LSTM(i, h), 3,
                     lambda i, h: rnnkit.LSTMCell(i, h, coupled=True),
                     lambda i, h: nn.LSTMCell(i, h)),
    "lstm_peephole_coupled": (
        lambda i, h, **k: rnnkit.LSTM(i, h, peephole=True, coupled=True, **k),
        lambda i, h: nn.LSTM(i, h), 3,
        lambda i, h: rnnkit.LSTMCell(i, h, peephole=True, coupled=True),
        lambda i, h: nn.LSTMCell(i, h)),
    "gru_after": (lambda i, h, **k: rnnkit.GRU(i, h, **k), lambda i, h: nn.GRU(i, h), 3,
                  lambda i, h: rnnkit.GRUCell(i, h), lambda i, h: nn.GRUCell(i, h)),
    "gru_before": (lambda i, h, **k: rnnkit.GRU(i, h, reset="before", **k),
                   lambda i, h: nn.GRU(i, h), 3,
                   lambda i, h: rnnkit.GRUCell(i, h, reset="before"),
                   lambda i, h: nn.GRUCell(i, h)),
    # layer-normalised cells (issue 12) against the plain torch.nn family: the goal is the cost of
    # the normalisation itself (fused forward+backward ≤ 1.3× nn.LSTM)
    "lstm_layer_norm": (lambda i, h, **k: rnnkit.LSTM(i, h, layer_norm=True, **k),
                        lambda i, h: nn.LSTM(i, h), 4,
                        lambda i, h: rnnkit.LSTMCell(i, h, layer_norm=True),
                        lambda i, h: nn.LSTMCell(i, h)),
    "gru_layer_norm": (lambda i, h, **k: rnnkit.GRU(i, h, layer_norm=True, **k),
                       lambda i, h: nn.GRU(i, h), 3,
                       lambda i, h: rnnkit.GRUCell(i, h, layer_norm=True),
                       lambda i, h: nn.GRUCell(i, h)),
}
SHAPES = [(35, 20, 200), (100, 32, 256), (50, 64, 512), (200, 1, 64)]


@dataclass
class Row:
    variant: str
    shape: tuple[int, int, int]
    mode: str
    ours_ms: float
    torch_ms: float
    gflops: float

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.torch_ms


# The statistic of each side's times: the median, or (``--stat min``, on a machine shared with
# other jobs) the minimum, the run the scheduler did not interrupt.
STAT: Callable[[list[float]], float] = statistics.median
# The clock: wall time, or (``--clock cpu``) this process's CPU time, which with one thread does
# not count the time slices other processes take on a shared core.
CLOCK: Callable[[], float] = time.perf_counter


def alternate(ours: Callable[[], object], theirs: Callable[[], object], repeats: int,
              warmup: int = 2, min_seconds: float = 1.0, max_repeats: int = 2000,
              stat: Callable[[list[float]], float] | None = None,
              clock: Callable[[], float] | None = None) -> tuple[float, float]:
    """``stat`` (default ``STAT``: the median) seconds of each callable, run alternately so both
    see the same machine state (``clock``, default ``CLOCK``: wall time, or
    ``time.process_time`` for CPU time on a shared machine).

    At least ``repeats`` runs each, more until each side has run ``min_seconds`` in total (a
    sub-millisecond case needs hundreds of runs for a stable median); the order flips every
    round so neither side always runs right after the other's cache-thrashing backward pass.
    """
    ours_times, their_times = interleaved(ours, theirs, repeats, warmup, min_seconds, max_repeats,
                                          clock=clock or CLOCK)
    stat = stat or STAT
    return stat(ours_times), stat(their_times)


def peak_gemm_rates(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a large square float32 matmul by each BLAS reachable here, now.

    torch.mm calls MKL, which on some AMD CPUs runs at about half the machine's rate; oneDNN
    (torch's ``mkldnn_linear``) and OpenBLAS (NumPy's) are measured too, and the best of them is
    the machine's peak that the achieved rates are compared with.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    candidates: dict[str, Callable[[], object]] = {"torch.mm (MKL)": lambda: a @ b}
    try:
        import numpy as np

        a_np, b_np = a.numpy(), b.numpy()
        candidates["NumPy (OpenBLAS)"] = lambda: np.matmul(a_np, b_np)
    except ImportError:
        pass
    if torch.backends.mkldnn.is_available():
        a_dnn, b_dnn = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
        candidates["oneDNN"] = lambda: torch._C._nn.mkldnn_linear(a_dnn, b_dnn)
    rates = {}
    for name, fn in candidates.items():
        try:
            fn()
        except RuntimeError:  # (a build without that path)
            continue
        times = []
        for _ in range(repeats):
            start = CLOCK()
            fn()
            times.append(CLOCK() - start)
        rates[name] = 2 * size**3 / min(times) / 1e9
    return rates


def layer_flops(gates: int, steps: int, batch: int, hidden: int, backward: bool) -> float:
    """GEMM FLOPs of one layer with input size H: forward 2·T·B·2H·GH, backward twice that."""
    forward = 2 * steps * batch * (2 * hidden) * gates * hidden
    return forward * (3 if backward else 1)


def bench_sequence(name: str, shape: tuple[int, int, int], repeats: int) -> list[Row]:
    make_ours, make_theirs, gates, _, _ = VARIANTS[name]
    steps, batch, hidden = shape
    ours, theirs = make_ours(hidden, hidden), make_theirs(hidden, hidden)
    x = torch.randn(steps, batch, hidden)
    x_grad = x.clone().requires_grad_()

    def forward(module: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(x)
        return run

    def train_step(module: nn.Module) -> Callable[[], object]:
        def run() -> object:
            out, _ = module(x_grad)
            out.sum().backward()
            return None
        return run

    rows = []
    for mode, make_fn, backward in (("forward", forward, False),
                                    ("forward+backward", train_step, True)):
        ours_s, theirs_s = alternate(make_fn(ours), make_fn(theirs), repeats)
        gflops = layer_flops(gates, steps, batch, hidden, backward) / ours_s / 1e9
        rows.append(Row(name, shape, mode, ours_s * 1e3, theirs_s * 1e3, gflops))
    return rows


def bench_single_step(name: str, hidden: int, repeats: int) -> Row:
    _, _, gates, make_cell, make_torch_cell = VARIANTS[name]
    ours, theirs = make_cell(hidden, hidden), make_torch_cell(hidden, hidden)
    x = torch.randn(1, hidden)
    our_state = ours.zero_state(1)
    their_state = tuple(our_state) if len(our_state) == 2 else our_state[0]

    def run_ours() -> object:
        with torch.no_grad():
            return ours(x, our_state)

    def run_theirs() -> object:
        with torch.no_grad():
            return theirs(x, their_state)

    ours_s, theirs_s = alternate(run_ours, run_theirs, repeats * 50, warmup=20)
    gflops = layer_flops(gates, 1, 1, hidden, False) / ours_s / 1e9
    return Row(name, (1, 1, hidden), "single step", ours_s * 1e3, theirs_s * 1e3, gflops)


def markdown(rows: list[Row], peaks: dict[str, float], backend: str) -> str:
    gemm = max(peaks.values())
    lines = [
        f"Backend `{backend}`, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "peak = the best large square float32 GEMM of this machine measured in the same run ("
        + ", ".join(f"{name} {rate:.0f}" for name, rate in peaks.items())
        + f" GFLOP/s: peak {gemm:.0f}). Ratio = rnnkit time / torch.nn time "
        "(below 1.00 is faster than torch.nn).",
        "",
        "| variant | T,B,H | mode | rnnkit ms | torch.nn ms | ratio | GFLOP/s | % of peak |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {','.join(map(str, r.shape))} | {r.mode} | {r.ours_ms:.2f} | "
            f"{r.torch_ms:.2f} | {r.ratio:.2f} | {r.gflops:.0f} | {100 * r.gflops / gemm:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["forward", "forward+backward", "single step"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 6), sharey=False)
    for ax, mode in zip(axes, modes):
        selected = [r for r in rows if r.mode == mode]
        labels = [f"{r.variant}\n{','.join(map(str, r.shape))}" for r in selected]
        ax.barh(range(len(selected)), [r.ratio for r in selected], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(range(len(selected)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"{mode}: time / torch.nn time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shapes", nargs="+", default=None, help="T,B,H triples")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default: docs/performance.md unless --quick)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="min: the steadier estimate on a machine shared with other jobs")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time; with --threads 1 it ignores time lost to "
                             "other jobs")
    parser.add_argument("--split", choices=["auto", "hidden", "batch"], default="auto",
                        help="how the kernels' 2+ loop threads share a time loop: hidden, a "
                             "slice of the hidden units each and a barrier every step; batch, a "
                             "block of the batch rows each and one join at the end; auto, the "
                             "kernels' rule")
    parser.add_argument("--section", default="speed",
                        help="the section of --out to (re)write (another name keeps the full "
                             "table and adds this run's rows as a section of their own)")
    args = parser.parse_args()
    global STAT, CLOCK
    STAT = min if args.stat == "min" else statistics.median
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    repeats = args.repeats
    if args.quick:
        shapes, repeats = [(35, 20, 200)], 3
    # a table is for one known thread count: the governor would shed threads while other work
    # runs (benchmarks/load.py measures that on purpose)
    threads.set_policy("fixed")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gemm = peak_gemm_rates()
    backend = get_default_backend()
    rows: list[Row] = []
    with fused.thread_split(args.split):
        for name in args.variants:
            for shape in shapes:
                rows.extend(bench_sequence(name, shape, repeats))
                print("\n".join(markdown(rows[-2:], gemm, backend).splitlines()[-2:]), flush=True)
            rows.append(bench_single_step(name, 256, repeats))
            print(markdown(rows[-1:], gemm, backend).splitlines()[-1], flush=True)
    table = markdown(rows, gemm, backend)
    print()
    print(table)
    out = args.out or (None if args.quick else Path("docs/performance.md"))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        full = args.section == "speed"  # (a section of some rows: a table, no chart)
        png = out.with_suffix(".png")
        if full:
            bar_chart(rows, png)
        command = " ".join(["python benchmarks/speed.py", *sys.argv[1:]]) if not full else (
            "python benchmarks/speed.py" + (f" --threads {args.threads}" if args.threads else "")
            + (f" --split {args.split}" if args.split != "auto" else ""))
        load = "{:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
        write_section(out, args.section, f"Measured by `{command}` on this project's 2-core CI "
                      f"machine kind ({args.stat} {args.clock} time of the interleaved runs); load "
                      f"average when it finished {load} (1 / 5 / 15 min).\n\n{table}"
                      + (f"\n![ratios]({png.name})\n" if full else ""))
        print(f"wrote {out}" + (f" and {png}" if full else ""))


if __name__ == "__main__":
    main()
