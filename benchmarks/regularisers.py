"""Speed of the issue-12 options (regularisers, layer norm) against a plain ``torch.nn.LSTM``.

For each option and each ``benchmarks/speed.py`` shape (T, B, H; input size H) it times one
training step (forward+backward, the layer in training mode, so the masks are drawn every call)
of ``rnnkit.LSTM(..., option)`` with the default (fused) backend, alternating with ``nn.LSTM`` in
the same process (``speed.alternate``), and prints the ratio rnnkit / torch.nn. Goals (issue 12):
≤ 1.10 at every shape for recurrent dropout, zoneout and DropConnect, ≤ 1.30 for layer norm.
The plain rnnkit LSTM is timed too, as dispatched and on rnnkit's own kernel.

On a shared machine a run is interrupted at random: each side's time is the process CPU time of
a run (``--clock cpu``, the default: time spent waiting for the core is not counted) and the
minimum of its runs (the run least disturbed by the other processes' cache traffic), and the
whole table is taken ``--rounds`` times, minutes apart, so that each row shows the spread of its
ratio over the rounds as well as the ratio of the minima over all of them.

    python benchmarks/regularisers.py --threads 1                  # table + docs/performance.md
    python benchmarks/regularisers.py --shapes 35,20,200 --options zoneout --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import rnnkit
from rnnkit.engine import fused, threads

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section
from speed import SHAPES, alternate

OPTIONS = {
    "plain": {},
    "plain, own kernel": {},  # rnnkit's kernel instead of torch's op (see fused.native_op)
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "zoneout": {"zoneout": 0.1},
    "zoneout_h+c": {"zoneout": 0.05, "zoneout_cell": 0.2},
    "weight_drop": {"weight_drop": 0.5},
    "all three": {"recurrent_dropout": 0.25, "zoneout": 0.1, "weight_drop": 0.5},
    "layer_norm": {"layer_norm": True},
}
GOALS = {"plain": None, "plain, own kernel": None, "layer_norm": 1.30}  # others: 1.10


def train_step(module: nn.Module, x: torch.Tensor, own_kernel: bool = False) -> Callable[[], None]:
    def run() -> None:
        fused.use_native = not own_kernel
        try:
            out, _ = module(x)
        finally:
            fused.use_native = True
        out.sum().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--shapes", nargs="+", default=None, help="T,B,H triples")
    parser.add_argument("--repeats", type=int, default=7, help="runs per side and round (at least)")
    parser.add_argument("--rounds", type=int, default=3, help="times the whole table is taken")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="process CPU time (default) or wall time per run")
    parser.add_argument("--no-write", action="store_true", help="print only (no docs/performance.md)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    threads.set_policy("fixed")  # (one known thread count: see speed.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.2f}' for v in load_start)}")
    cases = []  # (option, shape, rnnkit step, torch step)
    for shape in shapes:
        steps, batch, hidden = shape
        x = torch.randn(steps, batch, hidden, requires_grad=True)
        theirs = nn.LSTM(hidden, hidden)
        for name in args.options:
            ours = rnnkit.LSTM(hidden, hidden, **OPTIONS[name])
            if name != "layer_norm":  # (other parameters: its gains and biases)
                ours.load_state_dict(theirs.state_dict())
            cases.append((name, shape, train_step(ours, x, name == "plain, own kernel"),
                          train_step(theirs, x)))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[tuple[str, tuple[int, ...]], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}")
        for name, shape, ours, theirs in cases:
            ours_s, theirs_s = alternate(ours, theirs, args.repeats, stat=min, clock=clock)
            times.setdefault((name, shape), []).append((ours_s, theirs_s))
            print(f"  {name:18} {','.join(map(str, shape)):>11} {ours_s * 1e3:9.2f} "
                  f"{theirs_s * 1e3:9.2f} {ours_s / theirs_s:6.2f}", flush=True)
    load_end = os.getloadavg()
    lines = ["| option | T,B,H | rnnkit ms | nn.LSTM ms | ratio | ratio per round | goal |",
             "|---|---|---:|---:|---:|---|---|"]
    for name, shape, _, _ in cases:
        pairs = times[(name, shape)]
        ours_min, theirs_min = min(p[0] for p in pairs), min(p[1] for p in pairs)
        per_round = " ".join(f"{o / t:.2f}" for o, t in pairs)
        goal = GOALS.get(name, 1.10)
        verdict = "" if goal is None else (
            f"≤ {goal:.2f} " + ("met" if ours_min / theirs_min <= goal else "**not met**"))
        lines.append(f"| {name} | {','.join(map(str, shape))} | {ours_min * 1e3:.2f} | "
                     f"{theirs_min * 1e3:.2f} | {ours_min / theirs_min:.2f} | {per_round} | "
                     f"{verdict} |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    loads = " → ".join(" / ".join(f"{v:.1f}" for v in load) for load in (load_start, load_end))
    print(f"load average (1 / 5 / 15 min) {loads}")
    if args.no_write:
        return
    command = "python benchmarks/regularisers.py" + (
        f" --threads {args.threads}" if args.threads else "") + (
        f" --rounds {args.rounds}" if args.rounds != 3 else "") + (
        " --clock wall" if args.clock == "wall" else "")
    write_section(
        Path("docs/performance.md"), "regularisers",
        f"Measured by `{command}`: torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), load average (1 / 5 / 15 min) {loads}. One training step (forward + "
        "backward, training mode: masks drawn every call) of one layer, input size = H, "
        "alternating with `nn.LSTM` in one process; ms = the minimum "
        f"{'process CPU' if args.clock == 'cpu' else 'wall'} time over every run of every "
        f"round (≥ {args.repeats} runs per side and round, ≥ 1 s per side); ratio = rnnkit / "
        "nn.LSTM of those minima; \"ratio per round\" the same ratio in each round, in order "
        "(its spread is the noise).\n\n" + table)
    print("wrote docs/performance.md (section regularisers)")


if __name__ == "__main__":
    main()
