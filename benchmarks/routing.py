"""The plain LSTM's route table for this CPU: rnnkit's kernel against torch's oneDNN op.

For every shape (T, B, H) of a grid (input size = H) and mode — ``inference`` (forward under
``torch.inference_mode``: rnnkit's lean path) and ``training`` (forward+backward, the input
requiring a gradient) — this times one ``rnnkit.LSTM`` layer forced onto each path
(``fused.plain_lstm_path``), alternately in one process, and writes the ratio rnnkit's kernel /
torch's op per point into ``src/rnnkit/engine/fused/routes/<isa>.json`` (the dispatcher's table,
see ``rnnkit.engine.fused.route_table``), under the thread count, with the machine facts (CPU,
ISA key, torch version, date, load average, command). Entries of other thread counts in the file
are kept, so ``--threads 1`` and ``--threads 2`` runs fill one file; so are, for the same thread
count, the rows of a mode a ``--modes`` run did not measure (with their own machine facts,
``machine_<mode>``).

Times: the minimum over interleaved repeats (the order of the two paths swaps every round) of
process CPU time with one thread (time lost to other jobs on a shared core does not count), of
wall time with more (CPU time would add up the threads' spinning: measure those with the cores
quiet). Repeats per point: enough for ``--seconds`` of the slower path, within
[``--min-repeats``, ``--max-repeats``].

    taskset -c 1 python benchmarks/routing.py --threads 1            # ~15 min on a shared core
    python benchmarks/routing.py --threads 2                           # both cores quiet
    python benchmarks/routing.py --threads 1 --out /tmp/r.json --steps 35 --batches 20 --hiddens 200
    taskset -c 1 python benchmarks/routing.py --threads 1 --check 50,64,512 64,32,256  # routed vs both

The grid: T in {1, 10, 35, 100, 200}, B in {1, 4, 20, 32, 64}, H in {64, 128, 200, 256, 512}, a
full product (the lookup is nearest-neighbour in log space, which needs no gaps to stay local),
except training at T = 200 with B·H ≥ 32·256: ~37 % of the full grid's GEMM work, where the
per-step cost of both paths has settled by T = 100 (the built-in rules' AVX-512 measurements:
100,32,256 0.88 and 200,32,256 0.91).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rnnkit
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused, threads
from rnnkit.engine.fused import route_table

STEPS = (1, 10, 35, 100, 200)
BATCHES = (1, 4, 20, 32, 64)
HIDDENS = (64, 128, 200, 256, 512)
LONG_WIDE = (200, 32 * 256)  # training at T >= 200 with B·H >= this is not measured (docstring)


def grid(steps: tuple[int, ...], batches: tuple[int, ...], hiddens: tuple[int, ...],
         mode: str) -> list[tuple[int, int, int]]:
    """The shapes measured in ``mode``, cheapest first."""
    shapes = [(t, b, h) for t in steps for b in batches for h in hiddens
              if not (mode == "training" and t >= LONG_WIDE[0] and b * h >= LONG_WIDE[1])]
    return sorted(shapes, key=lambda s: (s[0] * s[1] * s[2] ** 2, s))


def runner(module: torch.nn.Module, x: torch.Tensor, path: str | None,
           mode: str) -> Callable[[], None]:
    """One call of ``module`` on ``path`` (None: the dispatcher's choice) in ``mode``."""

    def infer() -> None:
        with fused.plain_lstm_path(path), torch.inference_mode():
            module(x)

    def train() -> None:
        with fused.plain_lstm_path(path):
            out, _ = module(x)
            out.sum().backward()

    return infer if mode == "inference" else train


def measure(shape: tuple[int, int, int], mode: str, clock: Callable[[], float],
            args: argparse.Namespace, paths: tuple[str | None, ...] = fused.PATHS
            ) -> tuple[dict[str | None, float], int]:
    """({path: seconds}, repeats): the minimum of each path over interleaved calls (the order
    rotates every round), after warm-up calls of each."""
    steps, batch, hidden = shape
    torch.manual_seed(0)
    module = rnnkit.LSTM(hidden, hidden)
    x = torch.randn(steps, batch, hidden, requires_grad=mode == "training")
    runs = {path: runner(module, x, path, mode) for path in paths}
    times: dict[str | None, list[float]] = {path: [] for path in paths}

    def timed(path: str | None) -> float:
        module.zero_grad(set_to_none=True)  # (outside the clock: every path the same)
        x.grad = None
        start = clock()
        runs[path]()
        return clock() - start

    # two warm-up calls each: the first builds the lean path's plan, and a process's first
    # backward pays one-time costs (measured: 30 ms for a 1,1,64 layer whose calls take 1 ms)
    warm = max(timed(path) for path in paths)
    if warm < 1.0:
        warm = max(timed(path) for path in paths)
    repeats = min(args.max_repeats, max(args.min_repeats, math.ceil(args.seconds / max(warm, 1e-6))))
    for r in range(repeats):
        for path in paths[r % len(paths):] + paths[:r % len(paths)]:
            times[path].append(timed(path))
    return {path: min(t) for path, t in times.items()}, repeats


def check(shapes: list[tuple[int, int, int]], modes: list[str], clock: Callable[[], float],
          args: argparse.Namespace) -> None:
    """Prints, per shape and mode, the path the dispatcher takes and its time against the
    faster of the two forced paths (routed / best: 1.00 where it picks the faster)."""
    print(f"{'mode':<10} {'T,B,H':<12} {'route':>6} {'kernel ms':>10} {'torch ms':>10} "
          f"{'routed ms':>10} {'routed/best':>11}")
    for mode in modes:
        for shape in shapes:
            own = fused.own_kernel_faster(*shape, threads=args.threads,
                                          inference=mode == "inference")
            t, _ = measure(shape, mode, clock, args, (*fused.PATHS, None))
            best = min(t["kernel"], t["torch"])
            print(f"{mode:<10} {','.join(map(str, shape)):<12} {'kernel' if own else 'torch':>6} "
                  f"{t['kernel'] * 1e3:10.3f} {t['torch'] * 1e3:10.3f} {t[None] * 1e3:10.3f} "
                  f"{t[None] / best:11.2f}", flush=True)


def cpu_model() -> str:
    """'model name (family F model M)' from /proc/cpuinfo, else platform.processor()."""
    facts: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break  # (the first processor is enough)
                name, _, value = line.partition(":")
                facts[name.strip()] = value.strip()
    except OSError:
        return platform.processor() or "unknown"
    return (f"{facts.get('model name', 'unknown')} (family {facts.get('cpu family', '?')} "
            f"model {facts.get('model', '?')})")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dumps(table: dict) -> str:
    """``table`` as JSON: keys sorted (grid points by T, B, H as numbers), one grid point per
    line — a re-run makes a readable diff."""

    def order(key: str) -> tuple:
        parts = key.split(",")
        return (0, *map(int, parts)) if all(p.isdigit() for p in parts) else (1, key)

    def write(value: object, indent: int) -> str:
        if not isinstance(value, dict) or not value:
            return json.dumps(value, sort_keys=True)
        pad = " " * (indent + 1)
        flat = all(isinstance(v, dict) and not any(isinstance(w, dict) for w in v.values())
                   for v in value.values())
        items = [f"{pad}{json.dumps(k)}: "
                 + (json.dumps(v, sort_keys=True) if flat else write(v, indent + 1))
                 for k, v in sorted(value.items(), key=lambda kv: order(kv[0]))]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"

    return write(table, 0) + "\n"


def merge_modes(entry: dict, previous: dict, modes: list[str]) -> dict:
    """``entry`` (this run's rows of ``modes`` and its ``machine`` facts) with the rows of the
    modes this run did not measure kept from ``previous`` (the file's entry for the same thread
    count), each kept mode with the facts of the run that measured it as ``machine_<mode>``: a
    ``--modes inference`` run replaces the inference routes and leaves the training ones as
    they were, and the file still says under which conditions each was measured."""
    merged = dict(entry)
    for mode in route_table.MODES:
        if mode in modes or mode not in previous:
            continue
        merged[mode] = previous[mode]
        facts = previous.get(f"machine_{mode}", previous.get("machine"))
        if facts is not None:
            merged[f"machine_{mode}"] = facts
    return merged


def significant(seconds: float) -> float:
    """Milliseconds to 4 significant digits."""
    return float(f"{seconds * 1e3:.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, required=True, help="torch threads (1, 2, ...)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the table to write (default: the package's routes/<isa>.json)")
    parser.add_argument("--modes", nargs="*", default=list(route_table.MODES),
                        choices=list(route_table.MODES))
    parser.add_argument("--steps", nargs="*", type=int, default=list(STEPS))
    parser.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    parser.add_argument("--hiddens", nargs="*", type=int, default=list(HIDDENS))
    parser.add_argument("--seconds", type=float, default=0.25,
                        help="time the slower path for about this long per point and mode")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=25)
    parser.add_argument("--check", nargs="*", default=None, metavar="T,B,H",
                        help="instead of writing a table: time the dispatcher's route against "
                             "both forced paths at these shapes")
    args = parser.parse_args()

    threads.set_policy("fixed")  # (the governor must not shed the threads being measured)
    torch.set_num_threads(args.threads)
    reason = fused.unavailable_reason(CellSpec("lstm", peephole=True), torch.float32, "cpu")
    if reason is not None:
        raise SystemExit(f"rnnkit's kernels are unavailable: {reason}")
    isa = route_table.isa_key()
    out = args.out or route_table.ROUTES_DIR / f"{isa}.json"
    clock = time.process_time if args.threads == 1 else time.perf_counter
    clock_name = "process CPU time" if args.threads == 1 else "wall time"
    print(f"{isa}, torch {torch.__version__}, {args.threads} thread(s), min {clock_name} of "
          f"{args.min_repeats}-{args.max_repeats} interleaved repeats; ratio = rnnkit's kernel / "
          "torch's op (< 1: rnnkit's kernel)", flush=True)
    if args.check is not None:
        check([tuple(int(v) for v in text.split(",")) for text in args.check], args.modes, clock,
              args)
        return
    load_before = os.getloadavg()
    started, cpu_started = time.perf_counter(), time.process_time()
    entry: dict[str, object] = {}
    for mode in args.modes:
        rows = {}
        print(f"{mode:<10} {'T,B,H':<12} {'kernel ms':>10} {'torch ms':>10} {'ratio':>6} {'n':>3}")
        for shape in grid(tuple(args.steps), tuple(args.batches), tuple(args.hiddens), mode):
            t, repeats = measure(shape, mode, clock, args)
            own, theirs = t["kernel"], t["torch"]
            key = ",".join(map(str, shape))
            rows[key] = {"kernel_ms": significant(own), "torch_ms": significant(theirs),
                         "ratio": round(own / theirs, 3)}
            print(f"{'':<10} {key:<12} {own * 1e3:10.3f} {theirs * 1e3:10.3f} "
                  f"{own / theirs:6.3f} {repeats:3d}", flush=True)
        entry[mode] = rows
    load_after = os.getloadavg()
    entry["machine"] = {
        "command": "python " + shlex.join(["benchmarks/routing.py", *sys.argv[1:]]),
        "cpu": cpu_model(),
        "isa": isa,
        "torch": torch.__version__,
        "rnnkit_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "clock": f"min {clock_name} of {args.min_repeats}-{args.max_repeats} interleaved "
                 f"repeats, ~{args.seconds} s of the slower path per point",
        "load_average": (f"{load_before[0]:.2f} before, {load_after[0]:.2f} after "
                         "(1 min; the machine's, not this process's)"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "cpu_minutes": round((time.process_time() - cpu_started) / 60, 1),
        "modes": list(args.modes),
    }
    table = {"format": route_table.FORMAT, "isa": isa, "threads": {}}
    if out.exists():  # keep the other thread counts' entries
        try:
            previous = json.loads(out.read_text(encoding="utf-8"))
            if previous.get("format") == route_table.FORMAT and previous.get("isa") == isa:
                table["threads"] = previous["threads"]
        except (ValueError, KeyError, AttributeError):
            print(f"{out} was not a routing table: overwritten", file=sys.stderr)
    previous_entry = table["threads"].get(str(args.threads), {})
    table["threads"][str(args.threads)] = merge_modes(entry, previous_entry, args.modes)
    text = dumps(table)
    route_table.parse(text)  # (the dispatcher must read what was written)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({entry['machine']['minutes']} min)")


if __name__ == "__main__":
    main()
