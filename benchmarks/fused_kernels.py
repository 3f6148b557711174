"""Fused CPU backend vs torch.nn, measured alternately in one process.

For every cell variant and shape (T, B, H) (input size = H) this prints the median forward
(no grad) and forward+backward times of ``rnnkit.engine.fused.run_layer`` and of the torch.nn
module of the same family (nn.LSTM for every LSTM variant, nn.GRU for both GRU forms, nn.RNN
with the same nonlinearity, tanh for sigmoid), and their ratio (fused / torch; < 1 is faster).
The last row is one streaming step at batch 1 against one torch.nn.LSTMCell call.

    python benchmarks/fused_kernels.py                      # everything (~3 min on 2 cores)
    python benchmarks/fused_kernels.py --variants gru_before --shapes 35,20,200
    python benchmarks/fused_kernels.py --threads 1 --clock cpu --stat min   # on a busy machine
    python benchmarks/fused_kernels.py --threads 2 --split compare --no-native --no-stream

``--split compare`` times rnnkit's kernel with its loop threads splitting the batch rows against
the same kernel splitting the hidden units, alternately (ratio = batch split / hidden split).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rnnkit.engine import fused


@dataclass(frozen=True)
class Spec:
    kind: str
    nonlinearity: str = "tanh"
    peephole: bool = False
    coupled: bool = False
    reset: str = "after"


VARIANTS = {
    "lstm": Spec("lstm"),
    "lstm_peephole": Spec("lstm", peephole=True),
    "lstm_coupled": Spec("lstm", coupled=True),
    "lstm_coupled_peephole": Spec("lstm", peephole=True, coupled=True),
    "gru_after": Spec("gru"),
    "gru_before": Spec("gru", reset="before"),
    "rnn_tanh": Spec("rnn"),
    "rnn_relu": Spec("rnn", nonlinearity="relu"),
    "rnn_sigmoid": Spec("rnn", nonlinearity="sigmoid"),
}
TARGETS = {  # the ratio targets
    "lstm": 1.0,
    "gru_after": 1.0,
    "rnn_tanh": 1.0,
    "rnn_relu": 1.0,
    "lstm_peephole": 1.1,
    "gru_before": 1.1,
    "rnn_sigmoid": 1.1,
    "lstm_coupled": 1.3,
    "lstm_coupled_peephole": 1.3,
}
SHAPES = [(35, 20, 200), (100, 32, 256), (50, 64, 512), (200, 1, 64)]


def torch_module(spec: Spec, hidden: int) -> torch.nn.Module:
    if spec.kind == "lstm":
        return torch.nn.LSTM(hidden, hidden)
    if spec.kind == "gru":
        return torch.nn.GRU(hidden, hidden)
    nonlinearity = "relu" if spec.nonlinearity == "relu" else "tanh"
    return torch.nn.RNN(hidden, hidden, nonlinearity=nonlinearity)


def fused_params(spec: Spec, module: torch.nn.Module, hidden: int) -> tuple:
    w_ih, w_hh = module.weight_ih_l0, module.weight_hh_l0
    b_ih, b_hh = module.bias_ih_l0, module.bias_hh_l0
    if spec.kind == "lstm" and spec.coupled:  # drop the forget block: i, g, o
        keep = torch.cat([torch.arange(0, hidden), torch.arange(2 * hidden, 4 * hidden)])
        w_ih, w_hh, b_ih, b_hh = (t.detach()[keep] for t in (w_ih, w_hh, b_ih, b_hh))
    params = [t.detach().clone().requires_grad_() for t in (w_ih, w_hh, b_ih, b_hh)]
    if spec.kind == "lstm" and spec.peephole:
        params += [(0.1 * torch.randn(hidden)).requires_grad_() for _ in range(2 if spec.coupled else 3)]
    return tuple(params)


STAT = statistics.median
CLOCK = time.perf_counter
SPLIT = "auto"  # --split


def in_split(mode: str, run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with the kernels' loop threads split by ``mode`` (fused.thread_split)."""

    def split_run() -> None:
        with fused.thread_split(mode):
            run()

    return split_run


def alternate(a: Callable[[], None], b: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median (or ``--stat min``) seconds of a and b, timed in alternation after a warm-up."""
    for _ in range(3):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        start = CLOCK()
        a()
        ta.append(CLOCK() - start)
        start = CLOCK()
        b()
        tb.append(CLOCK() - start)
    return STAT(ta), STAT(tb)


def bench_variant(name: str, shape: tuple[int, int, int], repeats: int) -> tuple[float, ...]:
    spec = VARIANTS[name]
    steps, batch, hidden = shape
    torch.manual_seed(0)
    module = torch_module(spec, hidden)
    params = fused_params(spec, module, hidden)
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    nstate = 2 if spec.kind == "lstm" else 1
    state0 = tuple(torch.zeros(batch, hidden) for _ in range(nstate))
    hx = tuple(s.unsqueeze(0) for s in state0) if nstate == 2 else state0[0].unsqueeze(0)

    def fused_fwd() -> None:
        with torch.no_grad():
            fused.run_layer(spec, x, state0, params, None)

    def torch_fwd() -> None:
        with torch.no_grad():
            module(x, hx)

    def fused_train() -> None:
        out, _ = fused.run_layer(spec, x, state0, params, None)
        out.sum().backward()

    def torch_train() -> None:
        out, _ = module(x, hx)
        out.sum().backward()

    if SPLIT == "compare":  # the kernel's batch split (first) against its hidden split
        return (*alternate(in_split("batch", fused_fwd), in_split("hidden", fused_fwd), repeats),
                *alternate(in_split("batch", fused_train), in_split("hidden", fused_train),
                           repeats))
    ff, tf = alternate(fused_fwd, torch_fwd, repeats)
    fb, tb = alternate(fused_train, torch_train, repeats)
    return ff, tf, fb, tb


def bench_stream_step(repeats: int, hidden: int = 256) -> tuple[float, float]:
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(hidden, hidden)
    spec = VARIANTS["lstm"]
    params = tuple(t.detach() for t in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh))
    x = torch.randn(1, 1, hidden)
    h, c = torch.zeros(1, hidden), torch.zeros(1, hidden)

    def fused_step() -> None:
        with torch.no_grad():
            fused.run_layer(spec, x, (h, c), params, None)

    def torch_step() -> None:
        with torch.no_grad():
            cell(x[0], (h, c))

    return alternate(fused_step, torch_step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES], help="T,B,H triples"
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--split", choices=["auto", "hidden", "batch", "compare"], default="auto",
                        help="how the kernels' 2+ loop threads share a time loop: hidden, a "
                             "slice of the hidden units each and a barrier every step; batch, a "
                             "block of the batch rows each and one join at the end; auto, the "
                             "kernels' rule; compare: batch against hidden instead of torch.nn")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming-step row")
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="min is the steadier estimate on a machine shared with other jobs",
    )
    parser.add_argument(
        "--no-native",
        action="store_true",
        help="run the plain LSTM through rnnkit's kernel instead of torch's op",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time; with --threads 1 it ignores time lost to other jobs",
    )
    args = parser.parse_args()
    global STAT, CLOCK, SPLIT
    STAT = min if args.stat == "min" else statistics.median
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    SPLIT = args.split
    fused.use_native = not args.no_native
    if args.threads:
        torch.set_num_threads(args.threads)
    reason = fused.unavailable_reason(VARIANTS["gru_after"], torch.float32, "cpu")
    if reason is not None:
        raise SystemExit(f"fused backend unavailable: {reason}")
    compare = args.split == "compare"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads ({args.split} split), "
        f"float32, {args.stat} {args.clock} time of {args.repeats}; ratio = "
        + ("batch split / hidden split (fused both)" if compare
           else "fused / torch.nn (target in brackets)")
    )
    other = "hidden" if compare else "nn ms"
    header = (
        f"{'variant':<22} {'T,B,H':<12} {'fwd ms':>8} {other:>8} {'ratio':>6}  "
        f"{'f+b ms':>8} {other:>8} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    with fused.thread_split("auto" if compare else args.split):
        for name in args.variants:
            for text in args.shapes:
                shape = tuple(int(v) for v in text.split(","))
                ff, tf, fb, tb = bench_variant(name, shape, args.repeats)
                target = "" if compare else f"  [{TARGETS[name]:.2f}]"
                print(
                    f"{name:<22} {text:<12} {ff * 1e3:8.2f} {tf * 1e3:8.2f} {ff / tf:6.2f}  "
                    f"{fb * 1e3:8.2f} {tb * 1e3:8.2f} {fb / tb:6.2f}{target}",
                    flush=True,
                )
    if not args.no_stream:
        fs, ts = bench_stream_step(max(200, args.repeats))
        print(
            f"{'stream step (LSTMCell)':<22} {'1,1,256':<12} {fs * 1e3:8.3f} {ts * 1e3:8.3f} "
            f"{fs / ts:6.2f}  [1.00]"
        )


if __name__ == "__main__":
    main()
