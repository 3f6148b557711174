"""CTC loss + gradient time: rnnkit against torch.nn.functional.ctc_loss, side by side.

    python benchmarks/ctc.py            # prints a markdown table of median times and ratios
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rnnkit.losses import ctc_loss

# (frames T, batch N, classes C, label length S): digit strings, characters, long utterances
SHAPES = [(140, 32, 11, 5), (200, 16, 30, 40), (500, 8, 30, 100), (50, 64, 11, 3)]


def bench(fn, log_probs, targets, input_lengths, target_lengths) -> float:
    leaf = log_probs.detach().requires_grad_()
    start = time.perf_counter()
    loss = fn(leaf, targets, input_lengths, target_lengths)
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = rnnkit / torch")
    print("| T,N,C,S | rnnkit ms | torch ms | ratio |")
    print("|---|---:|---:|---:|")
    for steps, batch, classes, labels in SHAPES:
        log_probs = torch.randn(steps, batch, classes).log_softmax(2)
        targets = torch.randint(1, classes, (batch, labels))
        input_lengths = torch.full((batch,), steps)
        target_lengths = torch.randint(labels // 2 + 1, labels + 1, (batch,))
        ours, theirs = [], []
        for _ in range(2):  # warm-up
            bench(ctc_loss, log_probs, targets, input_lengths, target_lengths)
            bench(F.ctc_loss, log_probs, targets, input_lengths, target_lengths)
        for _ in range(args.repeats):
            ours.append(bench(ctc_loss, log_probs, targets, input_lengths, target_lengths))
            theirs.append(bench(F.ctc_loss, log_probs, targets, input_lengths, target_lengths))
        a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
        print(f"| {steps},{batch},{classes},{labels} | {a:.2f} | {b:.2f} | {a / b:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
