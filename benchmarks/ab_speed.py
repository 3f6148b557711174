"""Forward+backward time of two checkouts of rnnkit, side by side (did a change slow it down?).

Each round runs one child process per checkout, alternating, and every child times forward+backward
(loss = sum of the outputs) of one layer per variant and shape, input size = H, 1 thread. The
table is the minimum over every run of every round (the run the scheduler did not interrupt), in
process CPU time and in wall time, and the ratio after / before. The two checkouts need their own
kernel caches (each compiles its C++ on first use).

    git archive main src | tar -x -C /tmp/before     # the checkout to compare with
    python benchmarks/ab_speed.py --before /tmp/before/src --before-cache /tmp/torchext-before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = ["35,20,200", "100,32,256", "50,64,512", "200,1,64"]
# the plain LSTM runs torch's op at these shapes with 1 thread (the same code in any checkout)
DEFAULT_VARIANTS = ["rnn_tanh", "rnn_sigmoid", "lstm_peephole", "lstm_coupled",
                    "lstm_peephole_coupled", "gru_after", "gru_before"]


def child(variants: list[str], shapes: list[str], repeats: int) -> dict[str, list[float]]:
    import torch

    sys.path.insert(0, str(HERE))
    from rnnkit.engine import threads
    from speed import VARIANTS

    threads.set_policy("fixed")
    torch.set_num_threads(1)
    result = {}
    for variant in variants:
        for shape in shapes:
            steps, batch, hidden = (int(v) for v in shape.split(","))
            torch.manual_seed(0)
            module = VARIANTS[variant][0](hidden, hidden)
            x = torch.randn(steps, batch, hidden, requires_grad=True)
            cpu, wall = [], []
            for i in range(repeats + 1):
                c0, w0 = time.process_time(), time.perf_counter()
                module(x)[0].sum().backward()
                if i > 0:  # (the first run loads and warms)
                    cpu.append(time.process_time() - c0)
                    wall.append(time.perf_counter() - w0)
            result[f"{variant}@{shape}"] = [min(cpu), min(wall)]
    return result


def run_child(src: str, cache: str, variants: list[str], shapes: list[str],
              repeats: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=src, TORCH_EXTENSIONS_DIR=cache, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([variants, shapes, repeats])],
        check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="the other checkout's src directory")
    parser.add_argument("--before-cache", help="its TORCH_EXTENSIONS_DIR")
    parser.add_argument("--after", default=str(HERE.parent / "src"), help="this checkout's src")
    parser.add_argument("--after-cache", default=os.environ.get("TORCH_EXTENSIONS_DIR", ""),
                        help="its TORCH_EXTENSIONS_DIR (default: the environment's)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="T,B,H")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs per child")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    if not (args.before and args.before_cache):
        parser.error("--before and --before-cache are required")
    best: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    sides = {"before": (args.before, args.before_cache), "after": (args.after, args.after_cache)}
    for r in range(args.rounds):
        for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
            got = run_child(*sides[side], args.variants, args.shapes, args.repeats)
            for key, (cpu, wall) in got.items():
                old = best[side].get(key, [float("inf"), float("inf")])
                best[side][key] = [min(old[0], cpu), min(old[1], wall)]
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    load = os.getloadavg()
    lines = [f"min of {args.rounds} rounds x {args.repeats} runs, 1 thread, load average "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); ms", "",
             "| variant | T,B,H | before CPU | after CPU | after/before | before wall | after wall "
             "| after/before |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    for key in best["before"]:
        variant, shape = key.split("@")
        (bc, bw), (ac, aw) = best["before"][key], best["after"][key]
        lines.append(f"| {variant} | {shape} | {bc * 1e3:.2f} | {ac * 1e3:.2f} | {ac / bc:.3f} | "
                     f"{bw * 1e3:.2f} | {aw * 1e3:.2f} | {aw / bw:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
