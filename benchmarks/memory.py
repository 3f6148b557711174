"""Peak memory of one forward+backward: every rnnkit variant against the torch.nn module.

Each measurement runs in a fresh process: it builds the layer and the input, resets the kernel's
high-water mark of its resident memory (``/proc/self/clear_refs``), runs forward+backward once
and reports ``VmHWM - VmRSS`` before the run, i.e. the extra memory the pass needed at its peak
(activations saved for backward, workspaces, gradients). A warm-up pass at a small size first
loads the kernels so that code pages do not count. Linux only.

The fused kernel's backward walks time in chunks (its gate-gradient buffers hold a chunk's steps,
not all T): ``--chunks`` adds a table of the peak and of the forward+backward time (one process,
the chunk sizes interleaved, minimum of ``--repeats``) per chunk size (0 = automatic).

    python benchmarks/memory.py                          # T,B,H = 1000,32,512, every variant
    python benchmarks/memory.py --shape 200,32,256 --variants lstm gru_after
    python benchmarks/memory.py --variants rnn_tanh gru_after --chunks 32 64 0 256 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section
from speed import VARIANTS

SECTION = "memory"


def status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(re.search(rf"{key}:\s+(\d+)", fh.read()).group(1))


def set_chunk(steps: int) -> None:
    """The fused backward's chunk in time steps (0: automatic)."""
    from rnnkit.engine.fused import _build

    if _build.load() is not None:
        _build.load().set_backward_chunk(steps)


def measure_here(variant: str, side: str, shape: tuple[int, int, int], chunk: int = 0) -> float:
    """MiB of extra resident memory at the peak of one forward+backward, in this process."""
    import torch

    from rnnkit.engine import threads

    threads.set_policy("fixed")
    torch.set_num_threads(1)  # (thread-local buffers would blur the comparison)
    set_chunk(chunk)
    make_ours, make_theirs, _, _, _ = VARIANTS[variant]
    steps, batch, hidden = shape
    module = (make_ours if side == "rnnkit" else make_theirs)(hidden, hidden)
    # load kernels, allocate parameter gradients; the batch of the measured run, so that the
    # same route runs (the plain LSTM at batch 2 takes rnnkit's kernel, at 32 torch's op)
    small = torch.randn(3, batch, hidden, requires_grad=True)
    module(small)[0].sum().backward()
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current resident size
    before = status_kib("VmRSS")
    module(x)[0].sum().backward()
    return (status_kib("VmHWM") - before) / 1024


def measure(variant: str, side: str, shape: tuple[int, int, int], chunk: int = 0) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, side, ",".join(map(str, shape)),
         str(chunk)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["mib"]


def time_chunks(variant: str, shape: tuple[int, int, int], chunks: list[int],
                repeats: int) -> dict[int, float]:
    """Seconds of process CPU time of one forward+backward per chunk size: the sizes interleaved
    in one process, minimum of ``repeats`` each (the run the scheduler did not interrupt)."""
    import torch

    from rnnkit.engine import threads

    threads.set_policy("fixed")
    torch.set_num_threads(1)
    make_ours = VARIANTS[variant][0]
    steps, batch, hidden = shape
    torch.manual_seed(0)
    module = make_ours(hidden, hidden)
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    module(x[:3])[0].sum().backward()
    best = {chunk: float("inf") for chunk in chunks}
    for _ in range(repeats):
        for chunk in chunks:
            set_chunk(chunk)
            start = time.process_time()
            module(x)[0].sum().backward()
            best[chunk] = min(best[chunk], time.process_time() - start)
    set_chunk(0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shape", default="1000,32,512", help="T,B,H (input size = H)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file whose memory section to write")
    parser.add_argument("--chunks", nargs="+", type=int, default=[],
                        help="also peak and time per backward chunk size (steps; 0 = automatic)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per chunk size")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--time-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_child:
        variant, shape, chunks, repeats = args.time_child
        best = time_chunks(variant, tuple(int(v) for v in shape.split(",")),
                           [int(c) for c in chunks.split(",")], int(repeats))
        print(json.dumps(best))
        return
    if args.child:
        variant, side, shape, chunk = args.child
        mib = measure_here(variant, side, tuple(int(v) for v in shape.split(",")), int(chunk))
        print(json.dumps({"mib": mib}))
        return
    shape = tuple(int(v) for v in args.shape.split(","))
    steps, batch, hidden = shape
    floor = 4 * steps * batch * hidden / 2**20  # one (T, B, H) float32 tensor
    lines = [
        f"Measured by `python benchmarks/memory.py --shape {args.shape}`: extra resident memory "
        "at the peak of one forward+backward of one layer (input size = H, 1 thread), each in a "
        f"fresh process, in MiB; one (T, B, H) float32 tensor is {floor:.0f} MiB. Ratio = rnnkit / "
        "torch.nn of the same cell (target ≤ 1.00), and rnnkit / nn.LSTM (issue 16's wording).",
        "",
        "| variant | rnnkit MiB | torch.nn MiB | ratio | nn.LSTM MiB | ratio to nn.LSTM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    torch_peaks: dict[str, float] = {}  # by torch.nn class: every LSTM variant has nn.LSTM

    def torch_peak(variant: str) -> float:
        family = type(VARIANTS[variant][1](2, 2)).__name__
        if family not in torch_peaks:
            torch_peaks[family] = measure(variant, "torch", shape)
        return torch_peaks[family]

    lstm = torch_peak("lstm")
    for variant in args.variants:
        ours, theirs = measure(variant, "rnnkit", shape), torch_peak(variant)
        lines.append(f"| {variant} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} | "
                     f"{lstm:.0f} | {ours / lstm:.2f} |")
        print(lines[-1], flush=True)
    if args.chunks:
        lines += [
            "",
            f"The fused backward's chunk size at {args.shape} (`--chunks "
            f"{' '.join(map(str, args.chunks))}`; 0 = automatic, {steps} = one chunk): peak MiB "
            f"as above, and forward+backward process CPU time in s (1 thread, the sizes "
            f"interleaved in one process, minimum of {args.repeats}; load average "
            f"{os.getloadavg()[0]:.1f} at the start).",
            "",
            "| variant | " + " | ".join(f"chunk {c} MiB | s" for c in args.chunks) + " |",
            "|---|" + "---:|---:|" * len(args.chunks),
        ]
        for variant in args.variants:
            if variant == "lstm":  # (torch's op at this shape: no chunks)
                continue
            mib = {c: measure(variant, "rnnkit", shape, c) for c in args.chunks}
            out = subprocess.run(
                [sys.executable, __file__, "--time-child", variant, args.shape,
                 ",".join(map(str, args.chunks)), str(args.repeats)],
                check=True, capture_output=True, text=True)
            secs = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
            lines.append(f"| {variant} | " + " | ".join(
                f"{mib[c]:.0f} | {secs[c]:.2f}" for c in args.chunks) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.out is not None:
        write_section(args.out, SECTION, table)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
