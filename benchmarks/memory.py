"""Peak memory of one forward+backward: every rnnkit variant against the torch.nn module.

Each measurement runs in a fresh process: it builds the layer and the input, resets the kernel's
high-water mark of its resident memory (``/proc/self/clear_refs``), runs forward+backward once
and reports ``VmHWM - VmRSS`` before the run, i.e. the extra memory the pass needed at its peak
(activations saved for backward, workspaces, gradients). A warm-up pass at a small size first
loads the kernels so that code pages do not count. Linux only.

    python benchmarks/memory.py                          # T,B,H = 1000,32,512, every variant
    python benchmarks/memory.py --shape 200,32,256 --variants lstm gru_after
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section
from speed import VARIANTS

SECTION = "memory"


def status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(re.search(rf"{key}:\s+(\d+)", fh.read()).group(1))


def measure_here(variant: str, side: str, shape: tuple[int, int, int]) -> float:
    """MiB of extra resident memory at the peak of one forward+backward, in this process."""
    import torch

    from rnnkit.engine import threads

    threads.set_policy("fixed")
    torch.set_num_threads(1)  # (thread-local buffers would blur the comparison)
    make_ours, make_theirs, _, _, _ = VARIANTS[variant]
    steps, batch, hidden = shape
    module = (make_ours if side == "rnnkit" else make_theirs)(hidden, hidden)
    small = torch.randn(3, 2, hidden, requires_grad=True)
    module(small)[0].sum().backward()  # load kernels, allocate parameter gradients
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current resident size
    before = status_kib("VmRSS")
    module(x)[0].sum().backward()
    return (status_kib("VmHWM") - before) / 1024


def measure(variant: str, side: str, shape: tuple[int, int, int]) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, side, ",".join(map(str, shape))],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shape", default="1000,32,512", help="T,B,H (input size = H)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file whose memory section to write")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, side, shape = args.child
        mib = measure_here(variant, side, tuple(int(v) for v in shape.split(",")))
        print(json.dumps({"mib": mib}))
        return
    shape = tuple(int(v) for v in args.shape.split(","))
    steps, batch, hidden = shape
    floor = 4 * steps * batch * hidden / 2**20  # one (T, B, H) float32 tensor
    lines = [
        f"Measured by `python benchmarks/memory.py --shape {args.shape}`: extra resident memory "
        "at the peak of one forward+backward of one layer (input size = H, 1 thread), each in a "
        f"fresh process, in MiB; one (T, B, H) float32 tensor is {floor:.0f} MiB. Ratio = rnnkit / "
        "torch.nn (target ≤ 1.00).",
        "",
        "| variant | rnnkit MiB | torch.nn MiB | ratio |",
        "|---|---:|---:|---:|",
    ]
    for variant in args.variants:
        ours, theirs = measure(variant, "rnnkit", shape), measure(variant, "torch", shape)
        lines.append(f"| {variant} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.out is not None:
        write_section(args.out, SECTION, table)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
