"""Data-parallel scaling on one machine: 1 process × 2 threads, 1 × 1, and 2 processes × 1 thread.

For each task (charlm with its default model; sentiment on SST-2 with its default BiLSTM) the
same global batch is trained for ``--steps`` steps in each layout; throughput is the tokens
(characters, sentences) of the steps after the first ``--warmup`` ones divided by their
wall-clock time, read from the run's ``metrics.jsonl`` (validation and start-up excluded).
Efficiency = throughput / (workers × throughput of 1 × 1), workers = processes × threads.

It also prints, from the model's size, what one step moves in the gradient all-reduce against
the compute it does, on paper for networks this machine does not have. Not in CI::

    python benchmarks/scaling.py                          # both tasks, ~10 minutes
    python benchmarks/scaling.py --tasks charlm --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"

# (processes, threads per process)
LAYOUTS = [(1, 2), (1, 1), (2, 1)]
TASKS = {
    # the plain `rnnkit train charlm` model: LSTM 256, embedding 64, batch 32 × 100 characters
    "charlm": ["charlm", "--dropout", "0"],
    # the plain `rnnkit train sentiment` model: BiLSTM 128, max pooling, batch 64 sentences
    "sentiment": ["sentiment", "--dropout", "0"],
}
EXTRA = {"charlm": ["--set", "sample.count=0"]}  # no samples printed at the end
UNIT = {"charlm": "chars/s", "sentiment": "sentences/s"}


def run(task: str, processes: int, threads: int, steps: int, out: Path) -> dict[str, float]:
    run_dir = out / f"{task}-{processes}x{threads}"
    args = [sys.executable, "-m", "rnnkit", "train", *TASKS[task], "--out", str(run_dir),
            "--steps", str(steps), "--eval-every", str(10 * steps), "--threads", str(threads),
            "--no-progress", *EXTRA.get(task, [])]
    if processes > 1:
        args += ["--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise SystemExit(f"{task} {processes}x{threads} failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    return {"records": train, "wall": time.perf_counter() - started,
            "checkpoint": run_dir / "checkpoint.json"}


def throughput(records: list[dict], warmup: int) -> tuple[float, float]:
    """(tokens per second, seconds per step) over the steps after ``warmup``."""
    after = records[warmup:]
    seconds = after[-1]["time"] - records[warmup - 1]["time"]
    return sum(r["tokens"] for r in after) / seconds, seconds / len(after)


def model_size(checkpoint: Path) -> int:
    from rnnkit.train.checkpoint import load_checkpoint

    return sum(t.numel() for t in load_checkpoint(checkpoint).group("model").values())


def on_paper(parameters: int, step_seconds: float) -> str:
    """All-reduce bytes per step vs compute per step, for 2, 4 and 16 workers on 1 and 10 Gbit/s.

    Ring all-reduce: each worker sends (and receives) 2 (W - 1) / W of the float32 gradient of
    every parameter (embedding tables included: their gradients are dense). Compute: the step
    time measured here on one thread, divided by W (each worker runs 1/W of the global batch)."""
    grad_bytes = 4 * parameters
    lines = [f"gradient: {grad_bytes / 1e6:.2f} MB per step; compute: {1e3 * step_seconds:.0f} ms "
             "per step on one thread"]
    for workers in (2, 4, 16):
        moved = 2 * (workers - 1) / workers * grad_bytes
        compute = step_seconds / workers
        for gbit in (1, 10):
            comm = moved * 8 / (gbit * 1e9)
            lines.append(f"  {workers:2d} workers, {gbit:2d} Gbit/s: {moved / 1e6:.2f} MB per worker "
                         f"= {1e3 * comm:.1f} ms vs {1e3 * compute:.0f} ms compute "
                         f"(≤ {100 * comm / (comm + compute):.0f} % of the step, not overlapped)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="rnnkit-scaling-"))
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| task | layout | throughput | s/step | efficiency |")
    print("|---|---|---|---|---|")
    notes = []
    for task in args.tasks:
        if task == "sentiment" and not SST2.exists():
            print(f"| sentiment | skipped: {SST2} missing | | | |")
            continue
        measured = {}
        for processes, threads in LAYOUTS:
            measured[(processes, threads)] = run(task, processes, threads, args.steps, out)
        base, base_step = throughput(measured[(1, 1)]["records"], args.warmup)
        for (processes, threads), result in measured.items():
            rate, step = throughput(result["records"], args.warmup)
            efficiency = rate / (processes * threads * base)
            print(f"| {task} | {processes} process{'es' if processes > 1 else ''} × {threads} "
                  f"thread{'s' if threads > 1 else ''} | {rate:,.0f} {UNIT[task]} | {step:.3f} | "
                  f"{100 * efficiency:.0f} % |", flush=True)
        records = measured[(1, 1)]["records"]
        tokens = sum(r["tokens"] for r in records) / len(records)
        parameters = model_size(measured[(1, 1)]["checkpoint"])
        notes.append(f"{task}: {parameters:,} parameters, {tokens:,.0f} {UNIT[task][:-2]} per "
                     f"step\n{on_paper(parameters, base_step)}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("\n" + "\n\n".join(notes))
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
