"""Speed on a busy machine: rnnkit's default threading against its best fixed thread count.

With ``--busy 1`` (the default) the benchmark starts one single-threaded busy loop of its own (a
separate process, bounded in time, killed at the end) so that one core is taken, then times
forward+backward of one layer per variant and shape with

* ``1 thread`` and ``N threads`` (torch's setting fixed, rnnkit's thread governor off), and
* ``default``: N threads requested, rnnkit's governor on (``rnnkit.engine.threads``),

in rounds that alternate the three, and reports ``default / best fixed`` (target: ≤ 1.2) and the
torch.nn module of the family at both thread counts for reference. ``--busy 0`` measures the same
on an idle machine (the governor must not cost anything there).

    python benchmarks/load.py                        # one core busy, every variant, speed.py shapes
    python benchmarks/load.py --busy 0 --variants lstm gru_after --shapes 35,20,200
    python benchmarks/load.py --main-job             # also `rnnkit train charlm` for 100 steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from rnnkit.engine import fused, threads
from speed import SHAPES, VARIANTS

SECTION = "load"
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


@contextmanager
def busy_cores(count: int, seconds: float):
    """``count`` single-threaded busy loops in other processes, for at most ``seconds``."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=seconds)])
             for _ in range(count)]
    try:
        time.sleep(0.5 if procs else 0)  # let the scheduler see them before timing starts
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def timed(fn: Callable[[], object], repeats: int, seen: set[int] | None = None) -> float:
    """Median wall time of ``repeats`` calls; ``seen`` collects torch's thread count after each
    (the count the governor left for the call)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if seen is not None:
            seen.add(torch.get_num_threads())
    return statistics.median(times)


def modes(threads_max: int) -> dict[str, Callable[[], None]]:
    """How each mode sets torch and the governor before its runs."""
    def fixed(n: int) -> Callable[[], None]:
        def setup() -> None:
            threads.set_policy("fixed")
            torch.set_num_threads(n)
        return setup

    def adaptive() -> None:
        threads.set_policy("fixed")
        torch.set_num_threads(threads_max)
        threads.set_policy("adaptive")

    return {"1 thread": fixed(1), f"{threads_max} threads": fixed(threads_max),
            "default": adaptive}


def bench(name: str, shape: tuple[int, int, int], threads_max: int, rounds: int,
          repeats: int, with_torch: bool = True) -> tuple[dict[str, float], set[int]]:
    make_ours, make_theirs, _, _, _ = VARIANTS[name]
    steps, batch, hidden = shape
    ours, theirs = make_ours(hidden, hidden), make_theirs(hidden, hidden)
    x = torch.randn(steps, batch, hidden, requires_grad=True)

    def train_step(module: nn.Module) -> Callable[[], object]:
        def run() -> None:
            out, _ = module(x)
            out.sum().backward()
        return run

    results: dict[str, list[float]] = {}
    chosen: set[int] = set()  # the thread counts the governor chose in the default runs
    setups = modes(threads_max)
    for round_index in range(rounds):
        # each round starts with the next mode, so that no mode always runs right after the
        # collapsed 2-thread runs: in a fixed order the default (always next) read 1.06-1.42x
        # the 1-thread time at 200,1,64 in 8 of 10 variants with the same thread count (1-3 ms
        # a call; session 16); rotated, 7 of them re-measured 0.90-1.12 and 1.29 (1.06 over 20
        # rounds)
        order = list(setups.items())
        order = order[round_index % len(order):] + order[:round_index % len(order)]
        for mode, setup in order:
            setup()
            run = train_step(ours)
            run()  # warm-up (and, for the governor, its first samples)
            seen = chosen if mode == "default" else None
            results.setdefault(mode, []).append(timed(run, repeats, seen))
            if mode != "default" and with_torch:
                run = train_step(theirs)
                run()
                results.setdefault(f"torch.nn {mode}", []).append(timed(run, repeats))
    threads.set_policy("fixed")
    torch.set_num_threads(threads_max)
    threads.set_policy("adaptive")
    return {mode: statistics.median(values) * 1e3 for mode, values in results.items()}, chosen


def main_job(threads_max: int, steps: int) -> dict[str, float]:
    """Wall-clock seconds of ``rnnkit train charlm --steps N`` under each setting."""
    out: dict[str, float] = {}
    base = [sys.executable, "-m", "rnnkit", "train", "charlm", "--steps", str(steps)]
    runs = {"1 thread": (["--threads", "1"], {"RNNKIT_THREADS": "fixed"}),
            f"{threads_max} threads": (["--threads", str(threads_max)], {"RNNKIT_THREADS": "fixed"}),
            "default": ([], {})}
    for mode, (flags, env) in runs.items():
        with __import__("tempfile").TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            subprocess.run(base + flags + ["--out", run_dir, "--no-progress"], check=True,
                           env={**os.environ, **env}, stdout=subprocess.DEVNULL)
            out[mode] = time.perf_counter() - start
    return out


def torch_ms(result: dict[str, float], mode: str) -> str:
    """The torch.nn column's cell: skipped (``--skip-torch``) reads as a dash."""
    return f"{result[mode]:.1f}" if mode in result else "–"


def markdown(rows: list[tuple[str, tuple[int, int, int], dict[str, float], set[int]]],
             threads_max: int,
             busy: int, load: str) -> str:
    n = f"{threads_max} threads"
    lines = [
        f"Measured by `python benchmarks/load.py --busy {busy}`: torch {torch.__version__}, "
        f"{os.cpu_count()} cores, {busy} of them kept busy by a single-threaded loop in another "
        f"process started by the benchmark; load average before it started: {load}. "
        "Forward+backward of one layer (input size = H), median ms; `default` is rnnkit as a "
        f"user gets it ({threads_max} threads requested, thread governor on); the ratio is "
        "default / the better fixed count (target ≤ 1.2).",
        "",
        f"| variant | T,B,H | rnnkit 1 thread | rnnkit {n} | rnnkit default | default's threads "
        f"| default / best | torch.nn 1 thread | torch.nn {n} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, shape, r, chosen in rows:
        best = min(r["1 thread"], r[n])
        lines.append(
            f"| {name} | {','.join(map(str, shape))} | {r['1 thread']:.1f} | {r[n]:.1f} | "
            f"{r['default']:.1f} | {', '.join(map(str, sorted(chosen)))} | "
            f"{r['default'] / best:.2f} | {torch_ms(r, 'torch.nn 1 thread')} | "
            f"{torch_ms(r, 'torch.nn ' + n)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shapes", nargs="+", default=None, help="T,B,H triples")
    parser.add_argument("--busy", type=int, default=1, help="cores to keep busy (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="threads requested (default: every core)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--main-job", action="store_true",
                        help="also time `rnnkit train charlm --steps 100` in each setting")
    parser.add_argument("--skip-torch", action="store_true",
                        help="leave out the torch.nn columns (at 2 threads under load one "
                             "torch.nn call can take seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file whose load section to write (e.g. docs/performance.md)")
    parser.add_argument("--split", choices=["auto", "hidden", "batch"], default="auto",
                        help="how the kernels' 2+ loop threads share a time loop in this "
                             "process (see fused_kernels.py --split; not --main-job's)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    load = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    torch.manual_seed(0)
    rows = []
    with fused.thread_split(args.split), busy_cores(args.busy, seconds=3600):
        for name in args.variants:
            for shape in shapes:
                result, chosen = bench(name, shape, args.threads, args.rounds, args.repeats,
                                       with_torch=not args.skip_torch)
                rows.append((name, shape, result, chosen))
                print(markdown(rows[-1:], args.threads, args.busy, load).splitlines()[-1],
                      flush=True)
        job = main_job(args.threads, 100) if args.main_job else None
    table = markdown(rows, args.threads, args.busy, load)
    if job:
        table += ("\n`rnnkit train charlm --steps 100`, wall clock including start-up: "
                  + ", ".join(f"{mode} {seconds:.1f} s" for mode, seconds in job.items()) + "\n")
    print()
    print(table)
    if args.out is not None:
        from report import write_section

        write_section(args.out, f"{SECTION}-busy{args.busy}", table)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
