"""bfloat16 mixed precision: forward+backward in float32 vs under ``torch.autocast("cpu",
dtype=torch.bfloat16)``, every variant with a fused kernel, side by side in one process.

For each variant and shape one layer (input size = H) runs forward+backward (gradients of x and
every weight) three ways, interleaved round by round so that all see the same machine: rnnkit in
float32, rnnkit under bf16 autocast (the kernel's bf16 mode) and the torch.nn module of the
family under bf16 autocast (nn.LSTM for every LSTM variant: torch's oneDNN op in bf16 — what
the plain LSTM's route under autocast was chosen against). The MINIMUM of each side is
reported (the run the scheduler did not interrupt; on a quiet machine the median is close),
and the speed-up float32 / bf16 (target ≥ 1.6 at H ≥ 256).

On a shared, loaded core even the minimum wall time of a 20-300 ms run is inflated several
times over (every run is interrupted; measured at load 6: 116-158 ms wall against 19-30 ms of
CPU time), so with one thread the default clock is the process's CPU time (``--clock cpu``,
time.process_time: what the run itself executed), which the scheduler's interruptions do not
count. With more threads it is wall time (CPU time would add up the threads).

    python benchmarks/bf16.py                                   # all variants, 3 shapes
    python benchmarks/bf16.py --variants lstm gru_after --shapes 100,32,256 --repeats 5
    python benchmarks/bf16.py --clock wall                      # wall time (a quiet machine)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rnnkit.engine import precision, threads

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section
from speed import VARIANTS

SECTION = "bf16"
KERNEL_VARIANTS = [name for name in VARIANTS if "layer_norm" not in name]
SHAPES = [(100, 32, 256), (50, 64, 512), (35, 20, 200)]  # speed.py's H >= 256, one small
SIDES = ("rnnkit fp32", "rnnkit bf16", "torch.nn bf16")


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, mixed: bool) -> Callable[[], None]:
    params = [p for p in module.parameters()]

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out = module(x)[0]
        torch.autograd.grad(out.float().sum(), [x, *params])

    return run


def measure(variant: str, shape: tuple[int, int, int], repeats: int,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Minimum seconds (of ``clock``) of each side's forward+backward, sides interleaved."""
    make_ours, make_theirs, *_ = VARIANTS[variant]
    steps, batch, hidden = shape
    torch.manual_seed(0)
    ours, theirs = make_ours(hidden, hidden), make_theirs(hidden, hidden)
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    runs = {SIDES[0]: fwd_bwd(ours, x, False), SIDES[1]: fwd_bwd(ours, x, True),
            SIDES[2]: fwd_bwd(theirs, x, True)}
    for run in runs.values():  # warm-up: kernels, caches, the oneDNN kernel generation
        run()
    best = dict.fromkeys(runs, float("inf"))
    order = list(runs)
    for i in range(repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            start = clock()
            runs[name]()
            best[name] = min(best[name], clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=KERNEL_VARIANTS, choices=KERNEL_VARIANTS)
    parser.add_argument("--shapes", nargs="+", default=None, help="T,B,H (input size = H)")
    parser.add_argument("--repeats", type=int, default=9, help="runs of each side (minimum kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="time.process_time or time.perf_counter (default: cpu with one "
                             "thread, else wall)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs"
                        / "performance.md", help="markdown file whose bf16 section to write")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    precision.require_bf16()
    threads.set_policy("fixed")
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if args.threads == 1 else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes
              else SHAPES)
    load_before = os.getloadavg()
    rows = []
    header = ("| variant | T,B,H | rnnkit fp32 ms | rnnkit bf16 ms | speed-up | "
              "torch.nn bf16 ms | rnnkit bf16 / torch.nn bf16 |")
    print(header)
    for shape in shapes:
        for variant in args.variants:
            best = measure(variant, shape, args.repeats, clock)
            fp32, mixed, torch_mixed = (best[s] * 1e3 for s in SIDES)
            rows.append(f"| {variant} | {','.join(map(str, shape))} | {fp32:.1f} | {mixed:.1f} | "
                        f"{fp32 / mixed:.2f}× | {torch_mixed:.1f} | {mixed / torch_mixed:.2f} |")
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    flags = precision.cpu_flags() or frozenset()
    isa = ", ".join(f for f in precision.BF16_FLAGS if f in flags) or "?"
    text = "\n".join([
        "### bfloat16 mixed precision (autocast)",
        "",
        f"Measured by `python benchmarks/bf16.py --threads {args.threads} --repeats "
        f"{args.repeats} --clock {clock_name}`: one layer (input size = H), forward+backward "
        "(gradients of x and every weight), float32 against `torch.autocast(\"cpu\", "
        "dtype=torch.bfloat16)`, the sides interleaved in one process, minimum of the runs in "
        + ("ms of CPU time (time.process_time: on a loaded core the wall time of every run is "
           "inflated by the scheduler's interruptions)" if clock_name == "cpu" else
           "ms of wall time") + ". Speed-up = rnnkit fp32 / "
        "rnnkit bf16 (target ≥ 1.6× at H ≥ 256); the last column compares rnnkit's bf16 mode "
        "with torch.nn's (nn.LSTM for every LSTM variant, nn.GRU, nn.RNN) under the same "
        f"autocast. CPU bf16 instructions: {isa}; torch {torch.__version__}; "
        f"{args.threads} thread(s); load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after" + ((" (a loaded machine: other processes share the core "
                                          "and its caches)" if clock_name == "cpu" else
                                          " (a loaded machine: the minimum is the run the "
                                          "scheduler left alone)")
                                         if max(load_before[0], load_after[0]) > 1.5 else "")
        + ".",
        "",
        header,
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print()
    print(text)
    if not args.no_write:
        write_section(args.out, SECTION, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
