"""Speed of the recurrent regularisers (issue 12) against a plain ``torch.nn.LSTM`` of the same size.

For each regulariser and each ``benchmarks/speed.py`` shape (T, B, H; input size H) it times one
training step (forward+backward, the layer in training mode, so the masks are drawn every call)
of ``rnnkit.LSTM(..., option)`` with the default (fused) backend, alternating with ``nn.LSTM`` in
the same process (``speed.alternate``), and prints the ratio rnnkit / torch.nn. Goal: ≤ 1.10 at
every shape for recurrent dropout, zoneout and DropConnect. The plain rnnkit LSTM is timed too.

    python benchmarks/regularisers.py --threads 1
    python benchmarks/regularisers.py --shapes 35,20,200 --options zoneout
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import rnnkit
from rnnkit.engine import fused
from speed import SHAPES, alternate

OPTIONS = {
    "plain": {},
    "plain, own kernel": {},  # rnnkit's kernel instead of torch's op (see fused.native_op)
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "zoneout": {"zoneout": 0.1},
    "zoneout_h+c": {"zoneout": 0.05, "zoneout_cell": 0.2},
    "weight_drop": {"weight_drop": 0.5},
    "all three": {"recurrent_dropout": 0.25, "zoneout": 0.1, "weight_drop": 0.5},
}


def train_step(module: nn.Module, x: torch.Tensor):
    def run() -> None:
        out, _ = module(x)
        out.sum().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--shapes", nargs="+", default=None, help="T,B,H triples")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'option':18} {'T,B,H':>11} {'rnnkit ms':>10} {'nn.LSTM ms':>10} {'ratio':>6}")
    for shape in shapes:
        steps, batch, hidden = shape
        x = torch.randn(steps, batch, hidden, requires_grad=True)
        theirs = nn.LSTM(hidden, hidden)
        for name in args.options:
            ours = rnnkit.LSTM(hidden, hidden, **OPTIONS[name])
            ours.load_state_dict(theirs.state_dict())
            fused.use_native = name != "plain, own kernel"
            ours_s, theirs_s = alternate(train_step(ours, x), train_step(theirs, x), args.repeats)
            fused.use_native = True
            print(f"{name:18} {','.join(map(str, shape)):>11} {ours_s * 1e3:10.2f} "
                  f"{theirs_s * 1e3:10.2f} {ours_s / theirs_s:6.2f}", flush=True)
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
