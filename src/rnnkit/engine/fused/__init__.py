"""Fused CPU backend: a whole layer's time loop in C++ (compiled on first use).

Seam used by the engine::

    unavailable_reason(spec, dtype, device) -> str | None
    run_layer(spec, x, state0, params, batch_sizes) -> (outputs, final_state)
    run_step(spec, x_t, state, params) -> new_state | None      (inference only)

``spec`` is a cell math object (its ``spec``, a :class:`~rnnkit.cells.CellSpec`) or a CellSpec;
``_function.KERNELS`` maps each variant to its kernel and an unknown one raises. ``x`` is
(T, B, I); ``state0`` is ``(h0,)`` or ``(h0, c0)``; ``params`` is
``(w_ih, w_hh, b_ih | None, b_hh | None, *peephole)``; ``batch_sizes`` is None or T non-increasing
ints (active rows are the prefix; inactive rows keep their state and output 0).

The kernels are torch operators (``torch.ops.rnnkit_fused``, see ``_function``), so
``torch.compile``, ``torch.export`` and ``torch.library.opcheck`` see one operator per layer and
direction. They (``csrc/fused_rnn.cpp``) run the time loop inside one OpenMP region: each thread
owns a slice of hidden units, computes its columns of the recurrent GEMM with the oneDNN brgemm
micro-kernel that torch exports, updates its units, and meets the others at one barrier per step;
or, where the batch is wide enough, each thread runs the whole one-thread loop on a block of the
batch rows and the threads meet once, at the end (``thread_split`` forces either, for tests and
benchmarks). The input projection, ``dx`` and the weight gradients are single parallel GEMMs over
all steps.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the same kernels run in their bf16 mode
(``run_layer(..., bf16=True)``: every GEMM reads bf16 copies of its operands and writes float32;
state and pointwise math stay float32); ``route_of(spec, bf16=True)`` says which variants have
it (see :mod:`rnnkit.engine.precision`).

The layer-normalised LSTM and GRU have their own kernels (``csrc/layer_norm_rnn.cpp``, see
``_layer_norm``): a row's LN needs every column of the row, so there threads split the batch.

The standard torch forms with torch's own fused kernel (plain LSTM, which torch runs through
oneDNN's RNN primitive) dispatch to ``torch._VF`` instead where that is measured faster on this
CPU (see ``own_kernel_faster``, ``route_table`` and ``benchmarks/routing.py``).

Variants without a C++ kernel are routed explicitly by ``ROUTES`` (never by falling through):
the projected LSTM (``proj_size``) runs torch's op, which takes ``w_hr`` (a ragged batch: the
BPTT engine in chunks, faster than torch's packed op); the projected peephole/coupled LSTM runs
the BPTT engine (:mod:`rnnkit.engine.bptt`), whose cell math has the projection. A spec in
neither table raises, naming it. Ragged batches run in one kernel call (the BPTT engine in time
chunks, ``chunk_plan``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from rnnkit.cells import math_for
from rnnkit.cells.base import CellMath, CellSpec
from rnnkit.engine.bptt import run_bptt
from rnnkit.engine.fused import _build, _function, _layer_norm, route_table
from rnnkit.engine.fused._function import KERNELS, config_of, peephole_weights, run, spec_of
from rnnkit.engine.lengths import Ragged, zero_padding
from rnnkit.engine.reference import run_reference
from rnnkit.engine.regularise import StepMasks
from rnnkit.engine.threads import current_threads
from rnnkit.native import tracing

__all__ = ["BF16_FLOAT32", "PATHS", "ROUTES", "plain_lstm_path", "route_of", "run_layer", "run_step",
           "thread_split", "unavailable_reason"]

# The variants the fused backend runs without a kernel of its own, and the path each takes:
# "torch" is torch._VF.lstm (it has the projection: weights w_ih, w_hh, b_ih, b_hh, w_hr) for a
# padded batch and the BPTT engine in time chunks for a ragged one (run_layer); "bptt" the
# hand-derived BPTT engine. The C++ kernels have no projection.
ROUTES: dict[CellSpec, str] = {
    CellSpec("lstm", projection=True): "torch",
    CellSpec("lstm", peephole=True, projection=True): "bptt",
    CellSpec("lstm", coupled=True, projection=True): "bptt",
    CellSpec("lstm", peephole=True, coupled=True, projection=True): "bptt",
}


# Under torch.autocast("cpu", dtype=torch.bfloat16) (``bf16``, see rnnkit.engine.precision) every
# variant in KERNELS runs its kernel's bf16 mode — the plain LSTM too, rather than torch's op:
# torch's oneDNN LSTM under autocast rounds its states to bf16 as well, rnnkit's kernel keeps them
# float32, and the speed was a draw (benchmarks/bf16.py, loaded machine: rnnkit / torch 0.78-1.25
# over four runs and shapes). Everything else has no bf16 path and runs float32: the variants of
# ROUTES and the layer-normalised kernels (_layer_norm.KERNELS).
BF16_FLOAT32 = "float32"


def route_of(spec: Any, bf16: bool = False) -> str:
    """``"kernel"`` (a C++ kernel, or torch's op where ``native_op`` picks it) or the path in
    ``ROUTES``; under bf16 autocast ``"kernel"`` (its bf16 mode) or ``BF16_FLOAT32``. Raises
    ValueError naming a variant that has neither."""
    spec = spec_of(spec)
    if spec in KERNELS:
        return "kernel"
    if bf16 and (spec in ROUTES or spec in _layer_norm.KERNELS):
        return BF16_FLOAT32
    if spec in ROUTES:
        return ROUTES[spec]
    raise ValueError(f"no fused kernel for {spec}")

# Dispatch the plain LSTM to torch's own fused op (see native_op). Benchmarks turn it off to
# compare rnnkit's kernel on the same case.
use_native = True


def unavailable_reason(spec: Any, dtype: torch.dtype, device: torch.device | str,
                       masks: StepMasks | None = None) -> str | None:
    """None if the fused path can run ``spec`` for this dtype and device, else a short reason.

    ``masks`` (recurrent dropout, zoneout) need rnnkit's own kernel: torch's op has neither.
    """
    if masks is not None:
        names = masks.names()
        if names and not _function.MASKS_IN_KERNEL:
            return f"no fused kernel for {', '.join(names)}"
    device = torch.device(device)
    if device.type != "cpu":
        return f"device {device.type}"
    if dtype not in (torch.float32, torch.float64):
        return f"dtype {str(dtype).removeprefix('torch.')}"
    if getattr(spec, "layer_norm", False):  # their own kernels (issue 12): _layer_norm.KERNELS
        if _function.spec_of(spec) not in _layer_norm.KERNELS:
            return f"no fused kernel for {_function.spec_of(spec)}"
        if _layer_norm.load() is None:
            return _layer_norm.EXTENSION.error or "extension unavailable"
        return None
    try:
        spec = spec_of(spec)  # (once: a cell math object builds its CellSpec on every access)
        route = route_of(spec)
    except ValueError as exc:
        return str(exc)
    if route != "kernel":  # torch's op or the BPTT engine: nothing to compile
        return None
    if _build.load() is None and (native_op(spec) is None or masks is not None):
        return _build.error() or "extension unavailable"
    return None  # (without the extension the plain LSTM still runs through torch's op)


def normalises_input(spec: Any, x: Tensor) -> bool:
    """Whether :func:`run_layer` takes a layer-normalised ``spec``'s raw input and all its
    parameters and applies the input LN in its kernel (``_layer_norm.normalises_input``: every
    layer-normalised kernel), rather than ``x = LN(x W_ih^T)`` from the engine. False wherever
    the kernel cannot run (the engine then falls back to ``bptt``, which needs the input normalised)."""
    return (getattr(spec, "layer_norm", False)
            and unavailable_reason(spec, x.dtype, x.device) is None
            and _layer_norm.normalises_input(_function.spec_of(spec)))


def run_layer(
    spec: Any,
    x: Tensor,
    state0: Sequence[Tensor],
    params: Sequence[Tensor | None],
    batch_sizes: Ragged,
    masks: StepMasks | None = None,
    bf16: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Runs one layer in one direction; differentiable w.r.t. x, state0 and every param.

    ``batch_sizes``: see :data:`rnnkit.engine.lengths.Ragged` (a tensor: a traced graph).

    With ``masks`` (recurrent dropout, zoneout) torch's op never runs (it cannot apply them), and
    a ragged batch is not split into time chunks (the masks are laid out for the whole batch).
    ``bf16``: the kernel's bf16 mode (float32 tensors in and out; see ``route_of``); a variant
    without it raises.
    """
    if bf16 and route_of(spec, bf16=True) != "kernel":
        raise ValueError(f"no bfloat16 kernel for {spec_of(spec)}")
    if bf16:  # (its products run over all T·B rows: see zero_padding)
        x = zero_padding(x, batch_sizes)
    if getattr(spec, "layer_norm", False):  # (x: LN(x W_ih^T), or x: normalises_input)
        if masks is not None:  # (the layers refuse this combination; a direct call is told so)
            raise ValueError("the layer-normalised cells take no recurrent dropout or zoneout")
        if _layer_norm.load() is None:
            raise RuntimeError(f"fused backend unavailable: {_layer_norm.EXTENSION.error}")
        return _layer_norm.run(_function.spec_of(spec), x, state0, params, batch_sizes)
    if isinstance(batch_sizes, Tensor):  # a traced graph: the lengths tensor (lengths.Ragged)
        return _run_traced_lengths(spec, x, state0, params, batch_sizes, masks, bf16)
    bs = None if batch_sizes is None else [int(b) for b in batch_sizes]
    if bs is not None and all(b == x.shape[1] for b in bs):
        bs = None
    key = spec_of(spec)  # (once: a cell math object builds its CellSpec on every access)
    route = route_of(key)
    # A ragged projected LSTM takes the BPTT engine in chunks rather than torch's packed op:
    # measured (1 thread, CPU time) 124 vs 200 ms at 100,32,256 P=128 and 123 vs 368 ms at
    # 400,16,128 P=64, uniform lengths, forward+backward, before chunking.
    if route == "bptt" or (route == "torch" and (bs is not None or masks is not None)):
        math = spec if isinstance(spec, CellMath) else math_for(spec_of(spec))
        x = zero_padding(x, bs)  # (the BPTT engine's products run over all T·B rows)
        if bs is None or masks is not None:
            return run_bptt(math, x, tuple(state0), params, bs, masks)
        return _run_in_chunks(lambda xs, st, b: run_bptt(math, xs, st, params, b),
                              bs, x, state0, params)
    # a W_hh with a grad_fn was computed in this forward: the layers' DropConnect, W_hh ⊙ M
    # (a traced graph cannot read grad_fn: there the plain weight's choice, same results)
    dropped = params[1] is not None and not tracing() and params[1].grad_fn is not None
    native = None if masks is not None or bf16 else native_op(
        key, x, params[1].shape[1] if params[1] is not None else None, bs, dropped)
    if native is not None:
        return native(x, state0, params, bs)
    if _build.load() is None:
        raise RuntimeError(f"fused backend unavailable: {_build.error()}")
    cfg = config_of(key)
    # Save activations only when a gradient will be asked for.
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *state0, *params))
    # (a ragged batch in one call: the kernel's products run over the rows that ran only)
    return run(cfg, bs, x, state0, params, training, masks, bf16)


def _run_traced_lengths(spec: Any, x: Tensor, state0: Sequence[Tensor],
                        params: Sequence[Tensor | None], sorted_lengths: Tensor,
                        masks: StepMasks | None, bf16: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """A ragged batch in a traced graph: one ``layer_forward_lengths`` call, rnnkit's kernel for
    every variant it has (the plain LSTM too: whether torch's op would be chosen depends on the
    lengths' values, and rnnkit's kernel takes a ragged batch anyway). No time chunks (their
    plan is read from the values); the eager layer's results to float32 rounding."""
    key = spec_of(spec)
    if route_of(key) != "kernel":
        # ROUTES (the projected LSTMs): no kernel takes a lengths tensor, and torch's packed op
        # and the chunked BPTT engine read the values: the time loop unrolled in torch ops
        # (the reference engine), which the compiler sees whole — T is fixed into the graph
        math = spec if isinstance(spec, CellMath) else math_for(key)
        return run_reference(math, zero_padding(x, sorted_lengths), tuple(state0), params,
                             sorted_lengths, masks)
    if _build.load() is None:
        raise RuntimeError(f"fused backend unavailable: {_build.error()}")
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *state0, *params))
    return _function.run(config_of(key), sorted_lengths, x, state0, params, training, masks,
                         bf16)


# ---- ragged batches in the BPTT engine: time chunks ---------------------------------------------
#
# rnnkit's kernel takes a ragged batch in one call: every product of it runs over the rows that
# ran only (layer.h, Packed). The BPTT engine (the ragged projected LSTM) skips ended rows in
# its per-step work, but its input projection, dx and weight-gradient products run over all T·B
# rows. So there a ragged batch runs as a few calls over time chunks, each on the rows still
# running at the chunk's first step: the padding left is only the ragged edge inside each
# chunk. A chunk's
# fixed cost (Python, operator dispatch and autograd, the kernel's weight transposes and one more
# weight-gradient sum) is counted in row-steps (one row's forward+backward for one step, ~6
# flops per weight): CHUNK_ROWS + CHUNK_WEIGHTS / (number of weights). Fitted on the 2-core
# machine (1 thread, CPU time, load average 6-8) with benchmarks/lengths.py: CHUNK_ROWS 8 / 30 /
# 64-100 / one chunk gave, fwd+bwd of a 35,20,200 Elman layer with uniform lengths, 5.51 / 5.24
# / 4.86 / 4.84 ms (padded 4.66), of a 400,16,128 one 20.8 / 21.4 / 18.2 / 21.2 ms (padded 23.7).
CHUNK_ROWS = 64
CHUNK_WEIGHTS = 4e6
MAX_CHUNK_STARTS = 48


def chunk_cost(weights: int) -> float:
    """The fixed cost of one more call, in row-steps, for a layer of ``weights`` weights."""
    return CHUNK_ROWS + CHUNK_WEIGHTS / max(weights, 1)


def chunk_plan(batch_sizes: Sequence[int], cost: float = CHUNK_ROWS) -> list[tuple[int, int, int]]:
    """``(start, stop, rows)`` time chunks covering the steps where any row runs, each with the
    rows running at its first step, chosen to minimise Σ (stop − start)·rows + cost per chunk
    (a shortest path over the steps where the batch size changes). A chunk may start at any of
    those steps; past MAX_CHUNK_STARTS of them (large batches) an evenly spaced subset is the
    candidates, which keeps the quadratic search to ~1000 steps of Python."""
    starts = [t for t in range(len(batch_sizes)) if t == 0 or batch_sizes[t] != batch_sizes[t - 1]]
    starts = [t for t in starts if batch_sizes[t] > 0]
    if len(starts) > MAX_CHUNK_STARTS:
        pick = torch.linspace(0, len(starts) - 1, MAX_CHUNK_STARTS).round().long().tolist()
        starts = [starts[i] for i in sorted(set(pick))]
    end = next((t for t, b in enumerate(batch_sizes) if b == 0), len(batch_sizes))
    bounds = [*starts, end]
    best = [0.0] + [float("inf")] * len(starts)
    previous = [0] * (len(starts) + 1)
    for j in range(1, len(bounds)):
        for i in range(j):
            total = best[i] + (bounds[j] - bounds[i]) * batch_sizes[bounds[i]] + cost
            if total < best[j]:
                best[j], previous[j] = total, i
    plan, j = [], len(starts)
    while j > 0:
        i = previous[j]
        plan.append((bounds[i], bounds[j], batch_sizes[bounds[i]]))
        j = i
    return plan[::-1]


def _run_in_chunks(
    runner: Callable[[Tensor, tuple[Tensor, ...], list[int] | None], tuple[Tensor, Any]],
    bs: list[int],
    x: Tensor,
    state0: Sequence[Tensor],
    params: Sequence[Tensor | None],
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``runner(x, state0, batch_sizes)`` (one layer and direction) over the chunks of
    :func:`chunk_plan`; the same result as one call on the whole batch."""
    plan = chunk_plan(bs, chunk_cost(sum(p.numel() for p in params if p is not None)))
    if len(plan) == 1 and plan[0][2] == x.shape[1] and plan[0][1] == x.shape[0]:
        return runner(x, tuple(state0), bs)
    steps, batch = x.shape[0], x.shape[1]
    state = tuple(state0)
    if not plan:  # no row runs at all
        return x.new_zeros(steps, batch, state[0].shape[1]), state
    outputs = []
    done = 0
    # split, not x[start:stop]: the backward of a slice is a zero tensor of x's full size per
    # chunk, the backward of a split one concatenation
    sizes = [stop - start for start, stop, _ in plan]
    pieces = x.split([*sizes, steps - plan[-1][1]] if plan[-1][1] < steps else sizes)
    for (start, stop, rows), piece in zip(plan, pieces):
        chunk_bs = bs[start:stop]
        out, new = runner(piece[:, :rows], tuple(s[:rows] for s in state),
                          None if all(b == rows for b in chunk_bs) else chunk_bs)
        if rows < batch:  # rows that have ended: output 0, state kept
            out = torch.cat((out, out.new_zeros(stop - start, batch - rows, out.shape[2])), 1)
            new = tuple(torch.cat((n, s[rows:])) for n, s in zip(new, state))
        outputs.append(out)
        state, done = new, stop
    if done < steps:  # steps where no row runs
        outputs.append(x.new_zeros(steps - done, batch, outputs[0].shape[2]))
    return torch.cat(outputs), state


def run_step(
    spec: Any, x: Tensor, state: Sequence[Tensor], params: Sequence[Tensor | None]
) -> tuple[Tensor, ...] | None:
    """One streaming step (B, I) through the ``step`` operator, forward only; None where it
    cannot run (no kernel, dtype, device), so the caller takes the layer path.

    The short path matters: at batch 1 most of a step's time is per-call overhead, so the
    variant's kernel config is looked up once per cell math object and nothing else is checked.
    """
    if getattr(spec, "layer_norm", False):  # (their own step: rnnkit_ln::step)
        return _layer_norm.run_step(spec, x, state, params)
    cfg = getattr(spec, "_fused_step_config", None)
    if cfg is None:
        if (unavailable_reason(spec, x.dtype, x.device) is not None or _build.load() is None
                or route_of(spec) != "kernel"):
            return None
        cfg = config_of(spec)
        spec._fused_step_config = cfg
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    h, c = torch.ops.rnnkit_fused.step(*cfg.args(), x, state[0], state[1] if cfg.kind == 1 else None,
                                       params[0], params[1], params[2], params[3],
                                       peephole_weights(cfg, params), _function.loop_threads)
    return (h, c) if cfg.kind == 1 else (h,)


@contextlib.contextmanager
def thread_split(mode: str) -> Iterator[None]:
    """How the kernels' loop threads share a time loop inside the block (tests, benchmarks):
    ``"hidden"``, a slice of the hidden units each and a barrier every step; ``"batch"``, a block
    of the batch rows each and one join at the end; ``"auto"``, the kernels' rule."""
    ops = _build.load()
    if ops is None:
        raise RuntimeError(f"the fused kernels are unavailable: {_build.error()}")
    previous = ops.set_thread_split(mode)
    try:
        yield
    finally:
        ops.set_thread_split(previous)


# ---- torch's own fused op for the plain LSTM -----------------------------------------------------
#
# Which path a padded plain LSTM takes is measured per CPU: the table of this CPU's ISA key and
# thread count (route_table, written by benchmarks/routing.py) decides where there is one. The
# constants below are the built-in rules, measured on an AVX-512 CPU (the AVX-512 fallback, and
# every CPU's where no table has its ISA key or thread count); they stay as measured.

# torch's LSTM reorders its weights on every call (~0.7 ms at H=256) and pays a fixed cost per
# step: where the per-step GEMM is small rnnkit's kernel is faster. Measured on the 2-core CI
# machine kind, 2 threads, quiet, times relative to nn.LSTM (forward / forward+backward),
# rnnkit's kernel: T,B,H = 200,1,64: 0.91 / 0.69; 200,4,64: 0.79 / 0.67; 200,1,96: 0.55 / 0.47;
# 200,1,128: 0.72 / 0.63; 35,20,64: 0.95 / 0.85; 100,32,64: 0.83 / 0.97 — but 200,1,256: 1.61 /
# 1.33; 35,20,128: 1.07 / 1.06; 35,20,200: 1.11 / 1.27 (torch's op through rnnkit: 0.96–1.03).
# With 1 thread (2026-11-30, process CPU time, min of 9, load average 8–10; benchmarks/
# fused_kernels.py --threads 1 --clock cpu --stat min --no-native) the batch-1 advantage is gone:
# 200,1,64: 1.64 / 1.06 (again 1.75 / 1.16); 200,1,128: 1.58 / 1.11; 200,4,64: 1.01 / 0.92;
# 35,20,64: 1.05 / 1.00; 100,32,64: 1.02 / 1.02; 100,32,128: 1.09 / 1.06; 35,20,200: 1.04 /
# 1.06; 64,32,256: 1.08 / 1.07; 100,16,256: 1.07 / 1.04; 100,32,256: 1.10 / 0.91; 100,32,384:
# 1.02 / 0.95; 50,64,512: 1.03 / 1.03 — so the small-batch rule holds with 2+ threads only.
# (A ragged batch is another matter: see native_op.)
NATIVE_MIN_ROWS = 32

# Training (forward+backward) with 1 thread at long, wide batches: rnnkit's kernel. Its forward
# is 1.04-1.12x torch's op but its backward much faster: torch's backward time per step rises by
# ~17% between T = 64 and T = 100 (B = 32, H = 256: 1.07 -> 1.25 ms per step; rnnkit's stays
# 1.12-1.14). Measured 2026-12-01, 1 thread, process CPU time, min of 9-15 interleaved runs, load
# average 6-7 (shared core; benchmarks/fused_kernels.py --threads 1 --clock cpu --stat min
# --no-native --variants lstm --shapes ...), rnnkit's kernel / nn.LSTM forward+backward (forward):
# wins 100,32,256: 0.88 / 0.89 (1.09-1.12); 100,64,256: 0.89 (1.08); 200,32,256: 0.91 (1.12);
# 100,32,384: 0.94 (1.04); 100,32,512: 0.96 (1.10) — loses or even 64,32,256: 1.05; 50,64,512:
# 1.00 / 1.01; 35,20,200: 1.04 / 1.05; 100,16,256: 1.02; 100,32,128: 1.02. Forward only
# (no gradient asked for) stays with torch's op there. 2 threads on both cores, quiet (2026-12-01
# 07:30, load average 0.5-1.3; the same command with --threads 2 and wall time), two runs:
# 100,32,256: 0.86, 0.94; 50,64,512: 0.99, 0.92; 100,64,256: 0.93; 200,32,256: 0.94;
# 100,32,512: 1.00 — but 35,20,200: 1.04; 64,32,256: 1.13; 100,16,256: 1.12: the same rule.
OWN_TRAIN_MIN_STEPS = 100
OWN_TRAIN_MIN_BATCH = 32
OWN_TRAIN_MIN_HIDDEN = 256

# Inference at batch 1 (no gradient asked for): rnnkit's kernel, whose recurrent product is a
# matrix-vector product streaming W_hh once per step (gemv_rows). Measured 2026-11-30, 1 thread,
# forward under inference_mode, min of 15-40 interleaved runs, load average 5-6
# (benchmarks/inference.py's shapes), rnnkit's kernel / torch's op: T,B,H = 200,1,64: 0.94;
# 35,1,200: 0.83; 200,1,128: 0.92; 100,1,256: 0.27 (2.25 vs 8.40 ms); 50,1,512: 0.46; 20,1,256:
# 1.03 (even). With a gradient the batch-1 rule above stands (its backward was not re-measured).
INFERENCE_OWN_BATCH = 1

# Inference at any batch with 1 thread over at most this many steps: rnnkit's kernel. torch's op
# pays a fixed cost per call (its weight reorder, above) that only longer sequences amortise;
# rnnkit's lean inference path keeps its packed weights across calls (inference.py's plan).
# Measured 2026-12-01, 1 thread, inference_mode, process CPU time, min of 15-300 interleaved
# runs, load average 4.6-5.2 (one shared core), rnnkit's kernel / torch's op: T,B,H = 35,20,200
# 0.95; 20,20,200 0.91; 35,20,128 0.86; 50,64,512 0.97 — but 64,32,256 1.04; 100,32,256 1.05;
# 100,16,256 1.04; 100,32,128 1.02. Against onnxruntime (same run, benchmarks/inference.py's
# way): rnnkit's kernel 1.07 / 0.97 / 0.97 at 35,20,200 / 100,32,256 / 50,64,512, torch's op
# 1.16 / 0.94 / 1.02. 2 threads: not measured (one shared core), the rule below stands.
INFERENCE_OWN_MAX_STEPS = 50

# Training at small batches with a W_hh computed in the forward (DropConnect's W_hh ⊙ M, issue
# 12): rnnkit's kernel. Measured 2026-12-01, 1 thread, process CPU time, min of 20-30
# interleaved runs, load average 1.7-2 (one shared core), forward+backward / nn.LSTM of the same
# (undropped) size, weight_drop=0.5 through torch's op vs through rnnkit's kernel (the plain
# LSTM's in brackets): T,B,H = 200,1,64: 1.12 vs 1.04 (0.99 / 0.97), again 1.21 vs 1.08;
# 200,4,64: 1.12 vs 1.02 (1.03 / 0.99); 200,1,128: 1.04 vs 1.01 (0.99 / 0.97) — but at
# 35,20,200 torch's op stays ahead: 1.06 vs 1.07 (1.00 / 1.04).
DROPPED_OWN_BATCH = 4


# Which path the plain LSTM takes regardless of the rules (``plain_lstm_path``): "kernel"
# (rnnkit's), "torch" (torch's op) or None (own_kernel_faster decides).
_forced_path: str | None = None
PATHS = ("kernel", "torch")


@contextlib.contextmanager
def plain_lstm_path(path: str | None) -> Iterator[None]:
    """Runs the padded plain LSTM on ``path`` ("kernel": rnnkit's, "torch": torch's op; None:
    the measured choice) inside the block — for benchmarks/routing.py and tests, which time and
    compare both paths on the same shapes. (A ragged batch stays with rnnkit's kernel.)"""
    global _forced_path
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)} or None")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def own_kernel_faster(steps: int, batch: int, hidden: int, threads: int | None = None,
                      inference: bool = False, dropped_weight: bool = False) -> bool:
    """Whether rnnkit's kernel beats torch's oneDNN op on a padded plain LSTM of this shape
    with ``threads`` torch threads (default: torch's current count); ``inference``: forward
    only, no gradient asked for; ``dropped_weight``: W_hh is computed in this forward
    (weight_drop), not a parameter.

    The measured table of this CPU decides where it has this thread count
    (:mod:`~rnnkit.engine.fused.route_table`, written by benchmarks/routing.py); elsewhere the
    rules below, measured on an AVX-512 CPU. A dropped W_hh (not in the table: it times plain
    weights) keeps its rule either way."""
    if _forced_path is not None:
        return _forced_path == "kernel"
    if dropped_weight and not inference and batch <= DROPPED_OWN_BATCH:
        return True
    if not (isinstance(steps, int) and isinstance(batch, int)):
        # Symbolic sizes (torch.export / torch.compile with dynamic shapes): one graph serves
        # every size, so no measured point can choose; rnnkit's kernel is the operator with a
        # fake kernel, an exporter translation and the same result at every size.
        return True
    threads = current_threads() if threads is None else threads
    measured = route_table.own_faster(steps, batch, hidden, threads, inference)
    if measured is not None:
        return measured
    if steps * batch < NATIVE_MIN_ROWS:  # a streaming step: torch's per-call weight reorder
        return True
    if inference and batch <= INFERENCE_OWN_BATCH:
        return True
    if inference and threads == 1 and steps <= INFERENCE_OWN_MAX_STEPS:
        return True
    long_wide_training = (not inference and steps >= OWN_TRAIN_MIN_STEPS
                          and batch >= OWN_TRAIN_MIN_BATCH and hidden >= OWN_TRAIN_MIN_HIDDEN)
    if threads > 1:
        return long_wide_training or (batch <= 4 and hidden <= 128) or (batch <= 32 and hidden <= 64)
    return long_wide_training


def native_op(spec: Any, x: Tensor | None = None, hidden: int | None = None,
              batch_sizes: Sequence[int] | None = None, dropped_weight: bool = False):
    """torch._VF runner when ``spec`` is exactly a torch.nn form and torch's kernel is fastest.

    Only the plain LSTM qualifies: torch runs it through oneDNN's fused RNN primitive. torch's
    GRU and Elman RNN are per-step ATen loops that rnnkit's kernel beats (see the benchmark).
    Given the input ``x`` (T, B, I) and the hidden size, small problems stay with rnnkit's kernel.
    The projected plain LSTM always runs here (``ROUTES``: no C++ kernel has the projection).
    A ragged batch (``batch_sizes`` not all B) stays with rnnkit's kernel, which skips the rows
    that have ended: torch's packed op is 2.5-7x slower than its own padded op (see
    ``benchmarks/lengths.py``). ``dropped_weight``: W_hh is computed in this forward (see
    ``own_kernel_faster``).
    """
    spec = spec_of(spec)
    if ROUTES.get(spec) == "torch":
        return _run_vf_lstm
    if not (use_native and spec == CellSpec("lstm")):  # (a layer-norm spec is not this one)
        return None
    ragged = x is not None and batch_sizes is not None and any(b != x.shape[1] for b in batch_sizes)
    inference = not torch.is_grad_enabled()  # (no_grad / inference_mode: forward only)
    if ((ragged or (x is not None and hidden is not None
                    and own_kernel_faster(x.shape[0], x.shape[1], hidden, inference=inference,
                                          dropped_weight=dropped_weight)))
            and _build.load() is not None):
        return None
    return _run_vf_lstm


def _run_vf_lstm(
    x: Tensor,
    state0: Sequence[Tensor],
    params: Sequence[Tensor | None],
    batch_sizes: Sequence[int] | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    w_ih, w_hh, b_ih, b_hh = params[:4]
    has_bias = b_ih is not None
    weights = [w_ih, w_hh, b_ih, b_hh] if has_bias else [w_ih, w_hh]
    weights += params[4:]  # w_hr of a projected LSTM (torch tells by the number of weights)
    h0, c0 = (s.unsqueeze(0) for s in state0)
    steps, batch = x.shape[:2]
    if batch_sizes is None or all(b == batch for b in batch_sizes):
        out, h, c = torch._VF.lstm(x, (h0, c0), weights, has_bias, 1, 0.0, False, False, False)
        return out, (h[0], c[0])
    bs = [int(b) for b in batch_sizes]
    lengths = [sum(b > i for b in bs) for i in range(batch)]
    live = sum(1 for n in lengths if n > 0)
    if live == 0:
        return x.new_zeros(steps, batch, w_hh.shape[1]), tuple(state0)
    packed, bs_t = torch._VF._pack_padded_sequence(x[:, :live], torch.tensor(lengths[:live]), False)
    out_p, h, c = torch._VF.lstm(
        packed, bs_t, (h0[:, :live], c0[:, :live]), weights, has_bias, 1, 0.0, False, False
    )
    out, _ = torch._VF._pad_packed_sequence(out_p, bs_t, False, 0.0, steps)
    if live < batch:
        out = torch.cat((out, out.new_zeros(steps, batch - live, out.shape[2])), 1)
    h, c = h[0], c[0]
    if live < batch:  # rows that never ran keep their initial state
        h = torch.cat((h, state0[0][live:]))
        c = torch.cat((c, state0[1][live:]))
    return out, (h, c)
