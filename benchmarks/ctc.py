"""CTC loss + gradient time: rnnkit's C++ kernel and its pure-torch reference against
torch.nn.functional.ctc_loss, side by side in one process.

    python benchmarks/ctc.py                 # markdown table of median times and ratios
    python benchmarks/ctc.py --no-python     # skip the (slow) pure-torch reference
    python benchmarks/ctc.py --threads 1     # single-threaded

One timing is a forward and a backward of the summed loss (``reduction="mean"``) w.r.t. a
log-probability leaf. The three implementations are timed in turn within every repeat (not in
blocks), so load from other processes on a shared machine hits them alike; the table shows
medians, and the ratios are rnnkit time / torch time (≤ 1 means rnnkit is as fast or faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.losses import ctc_loss
from rnnkit.losses.ctc import native_unavailable_reason

# (frames T, batch N, classes C, label length S): digit strings, characters, long utterances,
# many short utterances
SHAPES = [(140, 32, 11, 5), (200, 16, 30, 40), (500, 8, 30, 100), (50, 64, 11, 3)]

Loss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def bench(fn: Loss, log_probs: Tensor, targets: Tensor, input_lengths: Tensor,
          target_lengths: Tensor) -> float:
    leaf = log_probs.detach().requires_grad_()
    start = time.perf_counter()
    loss = fn(leaf, targets, input_lengths, target_lengths)
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-python", action="store_true", help="skip the pure-torch reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reason = native_unavailable_reason()  # builds the kernel outside the timings
    if reason is not None:
        raise SystemExit(f"the native CTC kernel is unavailable: {reason}")
    contenders: dict[str, Loss] = {"native": partial(ctc_loss, backend="native")}
    if not args.no_python:
        contenders["python"] = partial(ctc_loss, backend="python")
    contenders["torch"] = F.ctc_loss

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"loss + grad, median of {args.repeats}; ratio = rnnkit / torch")
    names = [name for name in contenders if name != "torch"]
    print("| T,N,C,S | " + " | ".join(f"{name} ms" for name in names) + " | torch ms | "
          + " | ".join(f"{name} ratio" for name in names) + " |")
    print("|---|" + "---:|" * (2 * len(names) + 1))
    for steps, batch, classes, labels in SHAPES:
        log_probs = torch.randn(steps, batch, classes).log_softmax(2)
        targets = torch.randint(1, classes, (batch, labels))
        input_lengths = torch.full((batch,), steps)
        target_lengths = torch.randint(labels // 2 + 1, labels + 1, (batch,))
        case = (log_probs, targets, input_lengths, target_lengths)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(2):  # warm-up
            for fn in contenders.values():
                bench(fn, *case)
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                times[name].append(bench(fn, *case))
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        print(f"| {steps},{batch},{classes},{labels} | "
              + " | ".join(f"{ms[name]:.3f}" for name in names) + f" | {ms['torch']:.3f} | "
              + " | ".join(f"{ms[name] / ms['torch']:.2f}" for name in names) + " |", flush=True)


if __name__ == "__main__":
    main()
