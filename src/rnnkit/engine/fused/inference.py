"""The lean eager inference path: a layer's forward or a cell's step straight into the fused op.

Under ``torch.no_grad()`` / ``torch.inference_mode()`` nothing is saved and nothing can need a
gradient, so most of what the general forward does per call is bookkeeping that cannot change
the result: the autocast view, routing by spec, the engine's dispatch, the thread-count probe of
every layer, the peephole vectors stacked anew, zero initial states allocated anew. At batch 1
that bookkeeping is a large share of the time (a whole step in C++ is a few to a few tens of µs).
Here a layer (or cell) keeps a :class:`Prepared` plan — the kernel config and, per layer and
direction, the operator's weight arguments — and a call checks a few cheap conditions and calls
``torch.ops.rnnkit_fused.layer_forward`` / ``step`` directly.

At batch 1 (float32) the plan also keeps each weight packed for the batch-1 products
(``pack_gemv``: per gate, panels of W^T contiguous along K — one sequential stream per product,
as onnxruntime packs its weights once per session), made at the first batch-1 call and read by
``forward_packed`` (the input projection of all steps as one GEMM, each step's recurrent
product). A cell's plan keeps them, with the folded biases and the peepholes, in the one tensor
``step_stream`` reads (``pack_step``; on one thread, else ``step_packed``): the streaming step
then takes four arguments instead of sixteen (``rnnkit.streaming.Stream`` keeps that tensor and
the state, and makes one call per step). It costs a second copy of the weights while the plan
lives.

A one-layer, one-direction layer called again with an input of the same shape and no ``hx`` or
``lengths`` (a model's usual inference loop) runs its :class:`_Lane`: the operator and the
arguments the previous call resolved, once ``_plan`` has returned the same plan (the weights'
checks below run on every call).

The plan is keyed on every parameter's ``data_ptr()`` and ``_version``, on the number of
optimizer steps taken in this process and on a strided sample of every parameter's values:
``load_state_dict`` and other in-place writes (they bump ``_version``), ``.to()`` or assigning
``.data`` (new storage), any ``torch.optim`` step and a dense write through ``.data`` (no
version bump: the sample changes) all rebuild it. A sparse write through ``.data`` that misses
every sampled element (``p.data[i, j] = nan``) is not seen by the packed copies — batch 1 in
float32, and batched calls of ``PACKED_MIN_ROWS`` rows or more keep the old weights, other calls
read the new ones (found by the session-16 NaN fuzzer; seeing it would take comparing every
weight on every call); write in place under ``torch.no_grad()`` instead (it bumps
``_version``), as ``rnnkit.streaming.Stream`` documents too. The step count
is needed because torch's fused optimizers (``fused=True``, what rnnkit's Trainer uses on the
CPU) update parameters in one kernel without bumping ``_version``: the packed copies would
silently keep the old weights.
The plan holds references to the parameters it was built from, so a freed parameter's address
cannot be reused by another while the plan lives.

Anything this path does not cover returns None and the caller takes the general path, which
computes the same thing (and raises the one-line errors for bad input): gradients enabled,
``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` tracing (they must see the
parameters, not cached copies), autocast, tensor subclasses, another backend or device or
dtype, regularisers, inter-layer dropout in training mode, a ``PackedSequence``, lengths that
are not valid (the general path raises the error), a plain LSTM where torch's op is faster
(``own_kernel_faster``; a ragged batch stays here, as ``native_op`` keeps it on rnnkit's kernel),
the projected variants and the layer-normalised layers (a layer-normalised *cell* steps through
``rnnkit_ln::step``: :func:`layer_norm_cell_step`).

``lengths`` at batch > 1 (a ragged batch) runs here as the general path runs it: rows sorted
longest first in the same stable order (``lengths.longest_first``, read from the lengths as
Python ints), one operator call per layer and direction with the batch sizes (each step runs its
first ``batch_sizes[t]`` rows, the input projection only the rows that run, the outputs'
padding exactly 0, each row's final state at its last step), the reverse direction within each
row's length, then the rows put back in the caller's order. Lengths that all equal T are the
padded call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

import rnnkit.engine as _engine
from rnnkit.cells.base import weight_dtype
from rnnkit.engine import threads
from rnnkit.engine.fused import _build, _function, route_table
from rnnkit.engine.fused._function import KERNELS, Config, peephole_weights
from rnnkit.engine.lengths import every_row_runs, reversal_rows, reverse_rows, sort_rows
from rnnkit.native import builtin_operator, tracing

_ATTRIBUTE = "_inference_plan"  # (a plain attribute of the module: not a buffer, not saved)
_LANE = "_inference_lane"  # the last call resolved (_Lane): a plain attribute as well

# From this many rows (T·B, batch > 1) a layer's forward runs layer_forward_packed with the
# plan's packed weights: below it (and at batch 1) the kernel reads the weights as stored and
# packs nothing (kAsStoredRows, csrc/time_loop.h). Packing costs a transposed copy of each weight
# per call (~100 us each at H = 200, 5 % of a 35,20,200 LSTM forward); kept, it costs their
# memory once more.
PACKED_MIN_ROWS = 16
LANES = True  # whether a layer's repeated call runs its _Lane (False: always the full path;
# tests and benchmarks compare the two)


class Prepared(NamedTuple):
    """A module's cached operator arguments for the weights of one ``key``."""

    key: tuple[int, ...]
    cfg: Config
    weights: tuple[tuple[Tensor | None, ...], ...]  # per layer and direction: w_ih, w_hh, b_ih,
    # b_hh, peephole (P, H) or None — contiguous, in the op's order
    zeros: dict[tuple[Any, ...], Any]  # zero initial states by shape, and ("rows", *shape) ->
    # their rows (the op never writes its h0 / c0: it clones them)
    gemv: dict[tuple[int, int], Tensor]  # (layer and direction, 0: w_ih / 1: w_hh) -> the weight
    # packed for batch-1 products (``pack_gemv``), made at the first float32 batch-1 call
    packed: dict[tuple[int, int], tuple[Tensor, Tensor]]  # (layer and direction, gemm_layout)
    # -> pack_weights' W_ih^T and panel-packed W_hh^T for layer_forward_packed (batched calls),
    # made on first use: their layout follows the GEMM in use (set_gemm changes it)
    step: list[Tensor]  # a cell's weights as step_stream reads them (pack_step), made at the
    # first float32 batch-1 step: [] before, [empty tensor] on a CPU without the packed kernel
    sample_views: tuple[Any, ...]  # a few elements of every parameter (_sample_views) ...
    sample: tuple[Any, ...]  # ... and their values when the plan was made (_sample_of)


_optimizer_steps = 0  # torch.optim steps taken in this process (every plan's key holds it)


def _count_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _key(parameters: dict[str, Any]) -> tuple[int, ...]:
    """The optimizer steps so far, then each parameter's storage address and version."""
    key: list[int] = [_optimizer_steps]
    for p in parameters.values():
        if p is None:
            continue
        key.append(p.data_ptr())
        key.append(p._version)
    return tuple(key)


def _sample_views(parameters: dict[str, Any]) -> tuple[Any, ...]:
    """About 17 elements of every parameter, strided over all of it, as views of the parameter
    (a copy where it is not contiguous). A write through ``.data`` (``p.data.add_(p.grad,
    alpha=-lr)``, the hand-written SGD of pytorch/examples' word_language_model) changes neither
    ``data_ptr`` nor ``_version``: a changed sample is how the plan sees it (an update that
    changes every weight changes these elements; one that changes a few may miss them all: see
    the module docstring).

    Each view is a NumPy array over the parameter's memory where NumPy can alias it (float32 /
    float64 on the CPU: every parameter the lean path runs), compared by its bytes
    (``_sample_unchanged``): one ``torch.equal`` per parameter took ~4 µs warm and tens of µs
    after a kernel call had evicted the caches (measured 2026-12-01 on one peephole LSTM's 7
    parameters, `timeit` means of 3000 warm calls at load average ~7, so inflated by the load:
    torch.equal 28.4 µs, bytes 7.0 µs)."""
    views: list[Any] = []
    for p in parameters.values():
        if p is None:
            continue
        view = p.detach().reshape(-1)[:: max(1, p.numel() // 16)]
        try:
            views.append(view.numpy())
        except (TypeError, RuntimeError):  # (no NumPy dtype, or not on the CPU: torch.equal)
            views.append(view)
    return tuple(views)


def _sample_of(views: tuple[Any, ...]) -> tuple[Any, ...]:
    """The values of ``_sample_views``' views now: bytes of the NumPy ones, tensor copies of
    the others."""
    return tuple(view.clone() if isinstance(view, Tensor) else view.tobytes() for view in views)


def _sample_unchanged(plan: Prepared) -> bool:
    # (bytes, not values: a NaN weight keeps its plan while its bits stay, and a 0.0 written
    # over -0.0 rebuilds it — the same weights either way; a NaN never equals itself in
    # torch.equal, so a tensor-kept sample with a NaN rebuilds the plan on every call: slower,
    # still right)
    for view, old in zip(plan.sample_views, plan.sample):
        if isinstance(old, bytes):
            if view.tobytes() != old:
                return False
        elif not torch.equal(view, old):
            return False
    return True


def _usable(x: Any, dtype: torch.dtype) -> bool:
    """The cheap conditions every lean call needs (see the module docstring)."""
    return (type(x) is Tensor and x.dtype == dtype and x.is_cpu
            and dtype in (torch.float32, torch.float64)
            and not torch.is_grad_enabled() and not tracing()
            and not torch._C._is_tracing() and not torch.is_autocast_enabled("cpu"))
    # (torch._C._is_tracing: what torch.jit.is_tracing returns outside TorchScript, without its
    # Python frame and is_scripting call — each a few µs once a long call evicted the caches)


def _plan(module: Any, cfg: Config,
          params_of: Callable[[Any], Sequence[Sequence[Tensor | None]] | None]
          ) -> Prepared | None:
    """The module's plan for its current weights (rebuilt when the key changed);
    ``params_of(module)`` gives each layer's and direction's ``(w_ih, w_hh, b_ih, b_hh,
    *peephole)``."""
    key = _key(module._parameters)
    plan = module.__dict__.get(_ATTRIBUTE)
    if plan is not None and plan.key == key and _sample_unchanged(plan):
        return plan
    params_of = params_of(module)
    if params_of is None:
        return None
    owned = [id(p) for p in module._parameters.values()]
    if any(p is not None and id(p) not in owned for params in params_of for p in params):
        return None  # a parametrized weight (computed per call from what the dict holds)
    weights = []
    for params in params_of:
        w_ih, w_hh, b_ih, b_hh = (None if p is None else p.detach().contiguous() for p in params[:4])
        pw = peephole_weights(cfg, params)
        weights.append((w_ih, w_hh, b_ih, b_hh, None if pw is None else pw.detach().contiguous()))
    module.__dict__.pop(_LANE, None)  # (its arguments are the old plan's)
    views = _sample_views(module._parameters)
    plan = Prepared(key, cfg, tuple(weights), {}, {}, {}, [], views, _sample_of(views))
    module.__dict__[_ATTRIBUTE] = plan
    return plan


def _zeros(plan: Prepared, shape: tuple[int, ...], like: Tensor) -> Tensor:
    zeros = plan.zeros.get(shape)
    if zeros is None or zeros.dtype != like.dtype:
        zeros = plan.zeros[shape] = like.new_zeros(shape)
    return zeros


def _zero_rows(plan: Prepared, shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, ...]:
    """``_zeros(plan, shape, like)`` as a tuple of its rows (views made once: indexing the tensor
    on every call makes a new view each time, ~0.7 µs)."""
    key = ("rows", *shape)
    rows = plan.zeros.get(key)
    if rows is None or rows[0].dtype != like.dtype:
        rows = plan.zeros[key] = tuple(_zeros(plan, shape, like))
    return rows


def _gemv(plan: Prepared, index: int, which: int) -> Tensor:
    """Weight ``which`` (0: w_ih, 1: w_hh) of layer-and-direction ``index``, packed once per weight
    version as the batch-1 products stream it (as onnxruntime packs its weights once per session):
    per gate, panels of W^T contiguous along K. Empty on a CPU without the packed kernel (the op
    then reads the weight as stored)."""
    packed = plan.gemv.get((index, which))
    if packed is None:
        w_hh = plan.weights[index][1]
        gates = w_hh.shape[0] // w_hh.shape[1]
        packed = torch.ops.rnnkit_fused.pack_gemv.default(plan.weights[index][which], gates)
        plan.gemv[(index, which)] = packed
    return packed


def step_weights(plan: Prepared) -> Tensor:
    """A cell plan's weights packed once per weight version for ``step_stream`` (``pack_step``:
    a header naming the variant and sizes, both weights packed as ``pack_gemv`` packs them, the
    folded biases, the peepholes): the batch-1 step then takes four arguments where
    ``step_packed`` takes sixteen, each converted from Python on every call. Empty on a CPU
    without the packed kernel (then ``step`` runs)."""
    if not plan.step:
        plan.step.append(torch.ops.rnnkit_fused.pack_step.default(*plan.cfg.args(),
                                                                  *plan.weights[0]))
    return plan.step[0]


def _tiles(plan: Prepared, index: int, layout: int) -> tuple[Tensor, Tensor]:
    """Layer-and-direction ``index``'s W_ih^T and panel-packed W_hh^T for the batched GEMM tiles
    (``pack_weights``), made once per weight version and GEMM layout: the panels follow the GEMM
    the kernels run (``set_gemm``, for tests and benchmarks, changes it), and read in another
    layout they would give wrong outputs. ``layout``: ``_gemm_layout()``, read once per layer
    call (an operator call, ~3 µs warm)."""
    packed = plan.packed.get((index, layout))
    if packed is None:
        for stale in [key for key in plan.packed if key[0] == index]:
            del plan.packed[stale]  # (packed for another GEMM: not kept alive with the new one)
        w_ih, w_hh = plan.weights[index][:2]
        packed = plan.packed[(index, layout)] = torch.ops.rnnkit_fused.pack_weights.default(
            *plan.cfg.args(), w_ih, w_hh)
    return packed


def _gemm_layout() -> int:
    """The kernels' current packing layout (``gemm_layout``)."""
    return builtin_operator("rnnkit_fused::gemm_layout")()


def _config(module: Any) -> Config | None:
    """The module's kernel config, or None where this path does not run it. The variant's config
    is looked up once per module (building a math object's spec takes ~10 µs); the backend is
    read on every call (``set_default_backend`` may change it)."""
    if (module.__dict__.get("backend") or _engine._default_backend) != "fused":
        return None
    math = module.math
    cached = module.__dict__.get("_inference_config")
    if cached is None or cached[0] is not math:  # (keyed on the math object: it may be replaced)
        config = KERNELS.get(_function.spec_of(math)) if _build.load() is not None else None
        cached = module.__dict__["_inference_config"] = (math, config)
    return cached[1]


def _layer_params(layer: Any) -> list[Sequence[Tensor | None]]:
    """Each layer's and direction's ``(w_ih, w_hh, b_ih, b_hh, *peephole)``."""
    directions = layer.num_directions
    return [layer.layer_params(i // directions, i % directions)
            for i in range(layer.num_layers * directions)]


class _Lane(NamedTuple):
    """A one-layer, one-direction layer's last lean call without ``hx`` and ``lengths``, resolved:
    the operator and its arguments but the input. The next call of the same input shape with the
    same plan (``_plan`` returns the same object: same weights), math, GEMM layout and route runs
    the operator directly, skipping what only re-derives these arguments. Measured (2026-12-02,
    1 thread, CPU time, LSTM 35,20,200): the lean path's Python around the operator took 185 µs
    before it and 65 µs after it right after a 6 ms kernel call (the call evicts the
    interpreter's code and data from the caches, so each line run costs a few µs): 4 % of the
    call, where onnxruntime's session.run is about as fast as the operator alone."""

    plan: Prepared  # the plan the arguments come from (identity: a rebuilt plan drops the lane)
    shape: torch.Size  # the input's shape as the caller gave it ...
    batch_first: bool  # ... and how the layer read it
    math: Any  # the layer's math object (identity, as _config keys its config)
    layout: int  # _gemm_layout() when the arguments were made (0: not a batched packed call)
    route: tuple[Any, ...] | None  # a plain LSTM's: what own_kernel_faster's answer rests on
    # (_route_key) when the lane was made; None for the other variants (no route to choose)
    op: Any  # forward_packed (batch 1) or layer_forward_packed
    head: tuple[Any, ...]  # the arguments before the input
    tail: tuple[Any, ...]  # the arguments after it, but loop_threads (read on each call)
    states: int  # 1 (h) or 2 (h, c)


def _route_key() -> tuple[Any, ...]:
    """What ``own_kernel_faster``'s answer for a given shape depends on besides the shape: the
    switch to torch's op, a forced path, the route table in use and the thread count (the table
    itself never changes)."""
    fused = _fused()
    return (fused.use_native, fused._forced_path, route_table._active, torch.get_num_threads())


def _lane_forward(layer: Any, input: Tensor) -> tuple[Tensor, Any] | None:
    """``layer(input)`` through the layer's lane (see :class:`_Lane`), or None where it does not
    apply (the caller then runs ``layer_forward``'s full path, which makes a new lane)."""
    lane: _Lane | None = layer.__dict__.get(_LANE)
    if (lane is None or input.shape != lane.shape or lane.batch_first != layer.batch_first
            or lane.math is not layer.math
            or (layer.__dict__.get("backend") or _engine._default_backend) != "fused"
            or _plan(layer, lane.plan.cfg, _layer_params) is not lane.plan):
        return None
    if lane.route is not None and lane.route != _route_key():
        return None  # (the full path asks own_kernel_faster again)
    threads.adapt()
    if lane.layout and _gemm_layout() != lane.layout:
        return None
    x = input.transpose(0, 1) if layer.batch_first else input
    y, h, c = lane.op(*lane.head, x, *lane.tail, _function.loop_threads)
    output = y.transpose(0, 1) if layer.batch_first else y
    if lane.states == 1:
        return output, h.unsqueeze(0)
    return output, (h.unsqueeze(0), c.unsqueeze(0))


def layer_forward(layer: Any, input: Any, hx: Any, lengths: Any) -> tuple[Tensor, Any] | None:
    """``layer(input, hx, lengths=lengths)`` of a RecurrentLayer through the lean path, or None
    (the caller then runs the general forward)."""
    if (not _usable(input, weight_dtype(layer)) or input.dim() not in (2, 3)
            or input.shape[-1] != layer.input_size or layer._regularised_now()
            or (layer.training and layer.dropout > 0)):
        return None
    if hx is None and lengths is None and LANES:
        result = _lane_forward(layer, input)
        if result is not None:
            return result
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if layer.batch_first else input)
    steps, batch = x.shape[0], x.shape[1]
    if steps == 0:
        return None
    length = steps
    ragged = None  # a ragged batch: (sorted lengths, batch sizes, order, inverse)
    if lengths is not None:
        if batch == 1:  # run the first `length` steps, zeros after them (nothing to sort)
            length = _batch1_length(lengths)
            if not 1 <= length <= steps:
                return None  # (the general path says what is wrong)
        else:
            ragged = _ragged(lengths, batch, steps)
            if ragged is None:
                return None
            if not ragged:  # every row runs every step: the padded call
                ragged = None
    cfg = _config(layer)
    if cfg is None:
        return None
    hidden = layer.hidden_size
    route = None
    if cfg.kind == 1 and not cfg.peephole and not cfg.coupled and ragged is None:
        # (a ragged batch stays with rnnkit's kernel, as fused.native_op routes it)
        route = _route_key()
        fused = _fused()
        if fused.use_native and not fused.own_kernel_faster(steps, batch, hidden, inference=True):
            return None  # torch's op is faster here: the general path routes to it
    depth = layer.num_layers * layer.num_directions
    states = cfg.num_states
    if hx is not None:
        given = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        shape = (depth, hidden) if unbatched else (depth, batch, hidden)
        if len(given) != states or any(type(s) is not Tensor or s.shape != shape
                                       or s.dtype != x.dtype or not s.is_cpu
                                       for s in given):
            return None  # (the general path says what is wrong)
        if unbatched:
            given = tuple(s.unsqueeze(1) for s in given)
    plan = _plan(layer, cfg, _layer_params)
    if plan is None:
        return None
    sorted_lengths = batch_sizes = inverse = None
    if ragged is not None:  # rows longest first (as the general path sorts them)
        sorted_lengths, batch_sizes, order, inverse = ragged
        if order is not None:
            x = x.index_select(1, order)
            if hx is not None:
                given = tuple(s.index_select(1, order) for s in given)
    if hx is None:  # (each layer's and direction's row of the zeros, made once: a tuple)
        given = (_zero_rows(plan, (depth, batch, hidden), x),) * states
    threads.adapt()  # (as the general path: once per layer forward)
    # batch 1, float32: the products read W_ih and W_hh packed for matrix-vector products
    # (forward_packed); longer batches: W_ih^T and W_hh^T packed for the GEMM tiles
    # (layer_forward_packed), a ragged batch's steps over their first batch_sizes[t] rows and its
    # input projection over the rows that run only (forward_impl's Packed rows)
    op, batch1_op, batched_op = _ops()
    batch1_packed = batch == 1 and x.dtype == torch.float32
    batched_packed = batch > 1 and steps * batch >= PACKED_MIN_ROWS
    layout = _gemm_layout() if batched_packed else 0
    args = cfg.args()
    loop_threads = _function.loop_threads
    bs = [] if batch_sizes is None else batch_sizes
    reversal = None  # (the reverse direction's permutation of the rows, made when needed)
    layer_input = x if length == steps else x[:length]
    finals: list[list[Tensor]] = [[] for _ in range(states)]
    index = 0
    for _ in range(layer.num_layers):
        outputs = []
        for direction in range(layer.num_directions):
            w_ih, w_hh, b_ih, b_hh, pw = plan.weights[index]
            if direction == 1 and sorted_lengths is not None and reversal is None:
                reversal = reversal_rows(torch.tensor(sorted_lengths), steps)  # (once a call)
            source = layer_input if direction == 0 else reverse_rows(layer_input, reversal)
            c0 = given[1][index] if states == 2 else None
            if batch1_packed or batched_packed:
                if batch1_packed:
                    packed_op, packed = batch1_op, (_gemv(plan, index, 0), _gemv(plan, index, 1))
                else:
                    packed_op, packed = batched_op, (*_tiles(plan, index, layout), bs)
                tail = (given[0][index], c0, w_ih, w_hh, b_ih, b_hh, pw, *packed)
                y, h, c = packed_op(*args, source, *tail, loop_threads)
                if LANES and depth == 1 and hx is None and lengths is None and not unbatched:
                    layer.__dict__[_LANE] = _Lane(plan, input.shape, layer.batch_first,
                                                  layer.math, layout, route, packed_op,
                                                  args, tail, states)
            else:
                y, h, c, *_ = op(*args, source, given[0][index], c0, w_ih, w_hh, b_ih, b_hh, pw,
                                 None, None, None, bs, False, loop_threads, False)
            outputs.append(y if direction == 0 else reverse_rows(y, reversal))
            finals[0].append(h)
            if states == 2:
                finals[1].append(c)
            index += 1
        layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 2)
    output = layer_input
    if length < steps:  # (as torch.nn's packed sequences: outputs past the length are 0)
        output = torch.cat((output, output.new_zeros(steps - length, 1, output.shape[2])))
    # (one layer and direction: a view of the op's fresh (B, H) state, not a stacked copy)
    final = [f[0].unsqueeze(0) if depth == 1 else torch.stack(f) for f in finals]
    if inverse is not None:  # (the rows back in the caller's order)
        output = output.index_select(1, inverse)
        final = [s.index_select(1, inverse) for s in final]
    if unbatched:
        output, final = output.squeeze(1), [s.squeeze(1) for s in final]
    elif layer.batch_first:
        output = output.transpose(0, 1)
    return output, (final[0] if states == 1 else tuple(final))


def _batch1_length(lengths: Any) -> int:
    """The one length of a batch-1 ``lengths`` (0: not one this path reads; the general path
    then checks it and says what is wrong)."""
    if isinstance(lengths, Tensor):
        if lengths.shape != (1,) or lengths.is_floating_point() or lengths.is_complex():
            return 0
        return int(lengths[0])
    if isinstance(lengths, (list, tuple)) and len(lengths) == 1 and type(lengths[0]) is int:
        return lengths[0]
    return 0


def _ragged(lengths: Any, batch: int, steps: int
            ) -> tuple[list[int], list[int], Tensor | None, Tensor | None] | tuple[()] | None:
    """A batch's ``lengths`` as the kernels run them, in the general path's order
    (``lengths.sort_rows``: ``sort_by_length``'s stable longest-first order):
    ``(sorted_lengths, batch_sizes, order, inverse)`` (order and inverse None when already
    longest first); ``()`` when every row runs every step (the padded call); None for lengths
    this path does not read or that are not valid (the general path then checks them and raises
    the error). Read once as Python ints, as the general path reads them (6 µs; the tensor forms
    took ~0.39 ms, see ``longest_first``)."""
    if isinstance(lengths, Tensor):
        if (lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex()
                or lengths.dtype == torch.bool):
            return None
        values = lengths.tolist()
    elif isinstance(lengths, (list, tuple)):
        values = list(lengths)
        for value in values:
            if type(value) is not int:
                return None
    else:
        return None
    if len(values) != batch or not values or min(values) < 1 or max(values) > steps:
        # (batch 0, lengths []: the general path's empty result; min() of no values raised)
        return None
    if every_row_runs(values, steps):
        return ()
    order, inverse, sorted_lengths, batch_sizes = sort_rows(values, steps)
    assert batch_sizes is not None  # (a row ends early: not every row runs)
    if order is None:  # already longest first: no gathers
        return sorted_lengths, batch_sizes, None, None
    return (sorted_lengths, batch_sizes, torch.tensor(order, dtype=torch.int64),
            torch.tensor(inverse, dtype=torch.int64))


_OPS: tuple[Any, Any, Any] | None = None


def _ops() -> tuple[Any, Any, Any]:
    """The operators a layer forward calls (layer_forward, forward_packed, layer_forward_packed),
    looked up once: three ``torch.ops`` lookups cost ~1.5 µs per call."""
    global _OPS
    if _OPS is None:
        ops = torch.ops.rnnkit_fused
        _OPS = (ops.layer_forward.default, ops.forward_packed.default,
                ops.layer_forward_packed.default)
    return _OPS


def _cell_params(cell: Any) -> list[tuple[Tensor | None, ...]] | None:
    """A cell's ``(w_ih, w_hh, b_ih, b_hh, *peephole)`` from its parameters' dict, or None."""
    parameters = cell._parameters
    try:
        return [(parameters["weight_ih"], parameters["weight_hh"], parameters.get("bias_ih"),
                 parameters.get("bias_hh"),
                 *(parameters[name] for name in cell.math.diagonal_names))]
    except KeyError:  # (a parametrized weight: then not in the dict)
        return None


def cell_step(cell: Any, x_t: Any, state: Any) -> tuple[Tensor, Any] | None:
    """``cell(x_t, state)`` of a RecurrentCell through the lean ``step`` call, or None."""
    weight = cell._parameters.get("weight_hh")
    if (weight is None or not _usable(x_t, weight.dtype) or x_t.dim() != 2
            or x_t.shape[1] != cell.input_size):
        return None
    cfg = _config(cell)
    if cfg is None:
        return layer_norm_cell_step(cell, x_t, state) if cell.math.layer_norm else None
    plan = _plan(cell, cfg, _cell_params)  # (a module-level function: a closure per call costs)
    if plan is None:
        return None
    shape = (x_t.shape[0], cell.hidden_size)
    if state is None:
        state = (_zeros(plan, shape, x_t),) * cfg.num_states
    elif isinstance(state, Tensor):
        state = (state,)
    if len(state) != cfg.num_states:
        return None
    for s in state:  # (a loop, not any(...): a generator costs a µs, a tenth of a step's Python)
        if type(s) is not Tensor or s.shape != shape or s.dtype != x_t.dtype or not s.is_cpu:
            return None  # (the general path says what is wrong)
    lstm = cfg.kind == 1
    batch1 = shape[0] == 1 and x_t.dtype == torch.float32
    packed = step_weights(plan) if batch1 and _one_thread() else None
    if packed is not None and packed.numel():  # (one thread, both weights packed: step_stream)
        step_stream = builtin_operator("rnnkit_fused::step_stream")
        return _finish(cell, lstm, *step_stream(x_t, state[0], state[1] if lstm else None, packed))
    w_ih, w_hh, b_ih, b_hh, pw = plan.weights[0]
    if batch1:  # (more threads: step_packed splits the units between them where it pays)
        h, c = torch.ops.rnnkit_fused.step_packed.default(
            cfg.kind, cfg.act, cfg.peephole, cfg.coupled, cfg.before, x_t, state[0],
            state[1] if lstm else None, w_ih, w_hh, b_ih, b_hh, pw, _gemv(plan, 0, 0),
            _gemv(plan, 0, 1), _function.loop_threads)
    else:
        h, c = torch.ops.rnnkit_fused.step.default(
            cfg.kind, cfg.act, cfg.peephole, cfg.coupled, cfg.before, x_t, state[0],
            state[1] if lstm else None, w_ih, w_hh, b_ih, b_hh, pw, _function.loop_threads)
    return _finish(cell, lstm, h, c)


def layer_norm_cell_step(cell: Any, x_t: Tensor, state: Any) -> tuple[Tensor, Any] | None:
    """``cell(x_t, state)`` of a layer-normalised cell through ``rnnkit_ln::step``
    (``_layer_norm.run_step``), or None. No plan: the step reads every parameter as stored (at a
    few rows its products read W once, as a packed copy would), so there is nothing to keep in
    step with the weights; what is left is the checks of :func:`cell_step`."""
    if (cell.__dict__.get("backend") or _engine._default_backend) != "fused":
        return None
    shape = (x_t.shape[0], cell.hidden_size)
    states = len(cell.math.state_names)
    if state is None:
        state = (x_t.new_zeros(shape),) * states
    elif isinstance(state, Tensor):
        state = (state,)
    if len(state) != states:
        return None
    for s in state:
        if type(s) is not Tensor or s.shape != shape or s.dtype != x_t.dtype or not s.is_cpu:
            return None  # (the general path says what is wrong)
    params = _cell_params(cell)
    if params is None:
        return None
    new_state = _fused()._layer_norm.run_step(cell.math, x_t, state, params[0])
    return None if new_state is None else (new_state[0], cell.math.make_state(new_state))


def _finish(cell: Any, lstm: bool, h: Tensor, c: Tensor) -> tuple[Tensor, Any]:
    """The cell's ``(output, state)`` from an operator's ``(h, c)``."""
    return h, cell.math.make_state((h, c) if lstm else (h,))


def _one_thread() -> bool:
    """Whether the step runs on one thread (step_stream's only form; with more, ``step`` splits
    the units between them)."""
    threads_ = _function.loop_threads
    return threads_ == 1 or (threads_ == 0 and torch.get_num_threads() == 1)


def _fused() -> Any:
    import rnnkit.engine.fused as fused

    return fused
