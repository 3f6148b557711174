"""Variable lengths: what a ragged batch costs, rnnkit's ``lengths=`` against torch's paths.

For each cell variant, shape (T, B, H) (input size = H) and length distribution it times
forward+backward (loss = sum of the outputs) of one layer four ways, alternating in one process:

* torch padded: the ``torch.nn`` module of the family on the padded (T, B, H) batch;
* torch packed: the same module on ``pack_padded_sequence(..., enforce_sorted=False)``;
* rnnkit padded: the rnnkit layer on the padded batch (every row runs T steps);
* rnnkit lengths: the rnnkit layer with ``lengths=`` (rows that have ended should cost nothing).

It prints the times, ``rnnkit lengths / rnnkit padded`` next to ``Σ lengths / (T·B)`` (the
fraction of real steps: the cost a length-proportional layer would have), their quotient
``prop`` (the cost of a real step with ``lengths=`` over that of a padded step: 1.00 is exactly
proportional to Σ lengths, above it the fixed or padded work that is left), ``rnnkit lengths /
torch padded`` and the time per real step and row (µs per Σ lengths). The longest sequence of
each batch is T, as when a batch is padded to its longest member.

    python benchmarks/lengths.py                                    # every variant, 3 shapes
    python benchmarks/lengths.py --variants lstm --shapes 100,32,256
    python benchmarks/lengths.py --threads 1 --clock cpu --stat min # on a busy machine
    python benchmarks/lengths.py --presorted ...  # lengths longest first: no sort gathers

``--presorted`` draws the same lengths but sorts them longest first (the same Σ lengths and
kernel work), so the layer gathers no rows: the difference to a run without it is what the
sort and unsort around the kernel cost (session 15: 2-4 ms of a 10-70 ms call at 400,16,128).

``--passes`` splits that difference by side, to tell which part a kernel reading x (or writing
the output) through a row index would save. It times, alternating in one process, the layer on
presorted lengths (P), the same with ``x.index_select(1, perm)`` before it (the input side's
gather and its backward: zeros + index_add), the same with ``output.index_select(1, perm)``
after it (the output side's), and the unsorted lengths (U, today's path); ``perm`` is a fixed
random permutation of the B rows (a gather costs the same whatever its content).

    python benchmarks/lengths.py --passes --threads 1 --clock cpu --stat min --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit

# name -> (rnnkit layer, torch.nn module of the same family); rnn_sigmoid against tanh nn.RNN
VARIANTS: dict[str, tuple[Callable[[int, int], nn.Module], Callable[[int, int], nn.Module]]] = {
    "lstm": (lambda i, h: rnnkit.LSTM(i, h), lambda i, h: nn.LSTM(i, h)),
    "lstm_peephole": (lambda i, h: rnnkit.LSTM(i, h, peephole=True), lambda i, h: nn.LSTM(i, h)),
    "lstm_coupled": (lambda i, h: rnnkit.LSTM(i, h, coupled=True), lambda i, h: nn.LSTM(i, h)),
    "lstm_peephole_coupled": (lambda i, h: rnnkit.LSTM(i, h, peephole=True, coupled=True),
                              lambda i, h: nn.LSTM(i, h)),
    "gru_after": (lambda i, h: rnnkit.GRU(i, h), lambda i, h: nn.GRU(i, h)),
    "gru_before": (lambda i, h: rnnkit.GRU(i, h, reset="before"), lambda i, h: nn.GRU(i, h)),
    "rnn_tanh": (lambda i, h: rnnkit.RNN(i, h), lambda i, h: nn.RNN(i, h)),
    "rnn_relu": (lambda i, h: rnnkit.RNN(i, h, nonlinearity="relu"),
                 lambda i, h: nn.RNN(i, h, nonlinearity="relu")),
    "rnn_sigmoid": (lambda i, h: rnnkit.RNN(i, h, nonlinearity="sigmoid"),
                    lambda i, h: nn.RNN(i, h)),
}
# The layer-normalised variants (their own kernels, layer_norm_rnn.cpp), against the torch.nn
# module of the family without LN (torch has no LN LSTM/GRU): "torch pad" is only a yardstick
# there; len/pad and prop compare rnnkit with itself.
LN_VARIANTS: dict[str, tuple[Callable[[int, int], nn.Module], Callable[[int, int], nn.Module]]] = {
    "lstm_layer_norm": (lambda i, h: rnnkit.LSTM(i, h, layer_norm=True),
                        lambda i, h: nn.LSTM(i, h)),
    "gru_layer_norm": (lambda i, h: rnnkit.GRU(i, h, layer_norm=True), lambda i, h: nn.GRU(i, h)),
    "gru_before_layer_norm": (lambda i, h: rnnkit.GRU(i, h, reset="before", layer_norm=True),
                              lambda i, h: nn.GRU(i, h)),
}
VARIANTS.update(LN_VARIANTS)
SHAPES = [(100, 32, 256), (400, 16, 128), (35, 20, 200)]


def draw_lengths(distribution: str, steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Lengths in [1, T] with the longest = T. ``uniform``: U(0.3T, T), the spread of sentences
    bucketed loosely; ``skewed``: T·(0.05 + 0.95·u³), mostly short with a long tail (utterances,
    documents); ``full``: every length T (nothing to skip: what ``lengths=`` costs over the
    padded call)."""
    if distribution == "full":
        return torch.full((batch,), steps, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, generator=generator)
    fraction = 0.3 + 0.7 * u if distribution == "uniform" else 0.05 + 0.95 * u**3
    lengths = (fraction * steps).ceil().long().clamp(1, steps)
    lengths[int(torch.randint(batch, (1,), generator=generator))] = steps
    return lengths


def timed(fns: list[Callable[[], object]], repeats: int, clock: Callable[[], float],
          stat: Callable[[list[float]], float]) -> list[float]:
    """``stat`` of each callable's time, the callables run in turn (rotating the order) so that
    all see the same machine state."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        order = list(range(len(fns)))
        order = order[round_ % len(fns):] + order[:round_ % len(fns)]
        for k in order:
            start = clock()
            fns[k]()
            times[k].append(clock() - start)
    return [stat(t) for t in times]


def bench(name: str, shape: tuple[int, int, int], lengths: torch.Tensor, repeats: int,
          clock: Callable[[], float], stat: Callable[[list[float]], float],
          skip_torch: bool = False) -> list[float]:
    make_ours, make_theirs = VARIANTS[name]
    steps, batch, hidden = shape
    ours, theirs = make_ours(hidden, hidden), make_theirs(hidden, hidden)
    x = torch.randn(steps, batch, hidden, requires_grad=True)

    def padded(module: nn.Module) -> Callable[[], object]:
        def run() -> None:
            out, _ = module(x)
            out.sum().backward()
        return run

    def packed() -> None:
        out, _ = theirs(pack_padded_sequence(x, lengths, enforce_sorted=False))
        out.data.sum().backward()

    def with_lengths() -> None:
        out, _ = ours(x, lengths=lengths)
        out.sum().backward()

    if skip_torch:  # (torch's columns NaN: rnnkit's own ratios only, in half the time or less)
        return [float("nan")] * 2 + timed([padded(ours), with_lengths], repeats, clock, stat)
    return timed([padded(theirs), packed, padded(ours), with_lengths], repeats, clock, stat)


def bench_passes(name: str, shape: tuple[int, int, int], lengths: torch.Tensor, repeats: int,
                 clock: Callable[[], float], stat: Callable[[list[float]], float]) -> list[float]:
    """``--passes``: the times of P, P + input gather, P + output gather and U (module doc)."""
    steps, batch, hidden = shape
    layer = VARIANTS[name][0](hidden, hidden)
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    presorted = lengths.sort(descending=True, stable=True).values
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(1))

    def run(lengths: torch.Tensor, gather_in: bool = False, gather_out: bool = False
            ) -> Callable[[], object]:
        def call() -> None:
            out, _ = layer(x.index_select(1, perm) if gather_in else x, lengths=lengths)
            (out.index_select(1, perm) if gather_out else out).sum().backward()
        return call

    return timed([run(presorted), run(presorted, gather_in=True),
                  run(presorted, gather_out=True), run(lengths)], repeats, clock, stat)


def cases(args: argparse.Namespace
          ) -> Iterator[tuple[str, str, tuple[int, ...], str, torch.Tensor]]:
    """Every (variant, shape as given, shape, distribution, drawn lengths) the options ask for."""
    for name in args.variants:
        for text in args.shapes:
            shape = tuple(int(v) for v in text.split(","))
            for distribution in args.distributions:
                yield name, text, shape, distribution, draw_lengths(distribution, shape[0],
                                                                    shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES],
                        help="T,B,H triples")
    parser.add_argument("--distributions", nargs="*", default=["uniform", "skewed"],
                        choices=["uniform", "skewed", "full"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="min is the steadier estimate on a machine shared with other jobs")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time; with --threads 1 it ignores time lost to "
                             "other jobs")
    parser.add_argument("--skip-torch", action="store_true",
                        help="time rnnkit padded and lengths= only (torch's columns: nan)")
    parser.add_argument("--presorted", action="store_true",
                        help="the lengths sorted longest first: no sort or unsort gathers")
    parser.add_argument("--passes", action="store_true",
                        help="the sort/unsort cost split into input and output side (module doc)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    stat = min if args.stat == "min" else statistics.median
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.stat} "
          f"{args.clock} time of {args.repeats}, load average {os.getloadavg()[0]:.2f}; "
          "forward+backward ms")
    if args.passes:
        header = (f"{'variant':<22} {'T,B,H':<11} {'lengths':<8} {'presorted':>9} {'+in':>6} "
                  f"{'+out':>6} {'unsorted':>8} {'U-P':>6} {'(U-P)/U':>7}")
        print(header)
        print("-" * len(header))
        for name, text, shape, distribution, lengths in cases(args):
            p, pin, pout, u = (t * 1e3 for t in bench_passes(
                name, shape, lengths, args.repeats, clock, stat))
            print(f"{name:<22} {text:<11} {distribution:<8} {p:9.2f} {pin - p:6.2f} "
                  f"{pout - p:6.2f} {u:8.2f} {u - p:6.2f} {(u - p) / u:7.2f}", flush=True)
        return
    header = (f"{'variant':<22} {'T,B,H':<11} {'lengths':<8} {'Σ/TB':>5} {'torch pad':>9} "
              f"{'packed':>8} {'rnnkit pad':>10} {'lengths':>8} {'len/pad':>7} {'prop':>5} {'len/torch':>9} "
              f"{'µs/Σ':>6}")
    print(header)
    print("-" * len(header))
    for name, text, shape, distribution, lengths in cases(args):
        if args.presorted:  # (stable: the layer's own order, so it gathers nothing)
            lengths = lengths.sort(descending=True, stable=True).values
        total = int(lengths.sum())
        fraction = total / (shape[0] * shape[1])
        tp, tk, rp, rl = bench(name, shape, lengths, args.repeats, clock, stat, args.skip_torch)
        print(f"{name:<22} {text:<11} {distribution:<8} {fraction:5.2f} "
              f"{tp * 1e3:9.1f} {tk * 1e3:8.1f} {rp * 1e3:10.1f} {rl * 1e3:8.1f} "
              f"{rl / rp:7.2f} {rl / rp / fraction:5.2f} {rl / tp:9.2f} "
              f"{rl / total * 1e6:6.2f}", flush=True)


if __name__ == "__main__":
    main()
