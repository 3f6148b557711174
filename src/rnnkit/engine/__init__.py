"""The engine: runs any cell's math over time for one layer and one direction.

Backends share one seam, ``run(math, x, state0, params, batch_sizes) -> (outputs, final_state)``:

* ``x`` is (T, B, I), sorted by length longest first; ``batch_sizes[t]`` is the number of rows
  still running at step t (``None``: all of them); rows past their length keep their state and
  output zeros;
* ``state0`` is a tuple of (B, H) tensors (``(h,)`` or ``(h, c)``);
* ``params`` is ``(w_ih, w_hh, b_ih, b_hh, *diagonal_weights)``, biases ``None`` without bias;
  ``w_ih`` is ``None`` when ``x`` is already the input projection (the layer-normalised cells,
  whose input LN :func:`run_layer` applies before calling a backend).

Backends:

* ``"reference"``: plain torch ops per step under autograd — the oracle;
* ``"bptt"``: one autograd node per layer with the cells' hand-derived backward and the weight
  gradients as single GEMMs over all steps;
* ``"fused"`` (the default): the whole time loop of a layer, forward and backward, in compiled
  C++ (:mod:`rnnkit.engine.fused`, built on first use). Where it cannot run (no compiler, a GPU
  tensor, an unsupported dtype) it falls back to ``"bptt"`` with a one-time warning naming why.
  On CUDA every cell therefore runs the ``bptt`` engine with torch's GPU kernels underneath.

Direction, stacking and dropout belong to the layers, not here. The regularisers that act inside
the time loop (recurrent dropout, zoneout) reach every backend as the ``masks`` the layer drew
(:mod:`rnnkit.engine.regularise`); a backend either applies them or is not chosen.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rnnkit.cells.base import CellMath, State
from rnnkit.cells.layer_norm import normalized_input
from rnnkit.engine import fused, precision, threads
from rnnkit.engine.bptt import run_bptt
from rnnkit.engine.lengths import Ragged, zero_padding
from rnnkit.engine.reference import run_reference
from rnnkit.engine.regularise import StepMasks
from rnnkit.validation import check_steps

Backend = Callable[
    [CellMath, Tensor, State, Sequence[Tensor | None], Sequence[int] | None, StepMasks | None],
    tuple[Tensor, State],
]

_fallbacks_warned: set[str] = set()


def run_fused(
    math: CellMath,
    x: Tensor,
    state0: State,
    params: Sequence[Tensor | None],
    batch_sizes: Sequence[int] | None,
    masks: StepMasks | None = None,
) -> tuple[Tensor, State]:
    """The compiled kernel where it can run; else the BPTT engine, saying why once."""
    reason = fused.unavailable_reason(math, x.dtype, x.device, masks)
    if reason is None:  # (under autocast here only where the kernel has a bf16 mode: run_layer)
        return fused.run_layer(math, x, state0, params, batch_sizes, masks,
                               bf16=precision.autocast_bf16(x.device, x.dtype))
    if isinstance(batch_sizes, Tensor):  # (the bptt engine cannot take a traced lengths tensor)
        raise ValueError(f"lengths= cannot be traced (torch.compile / torch.export) here: the "
                         f"fused CPU engine cannot run ({reason})")
    if reason not in _fallbacks_warned:
        _fallbacks_warned.add(reason)
        warnings.warn(
            f"rnnkit: the fused CPU engine cannot run here ({reason}); using the slower "
            "'bptt' engine instead", RuntimeWarning, stacklevel=4,
        )
    if not math.layer_norm:  # (a layer-normalised layer's x: zeroed by run_layer before its LN)
        x = zero_padding(x, batch_sizes)
    return run_bptt(math, x, state0, params, batch_sizes, masks)


BACKENDS: dict[str, Backend] = {"reference": run_reference, "bptt": run_bptt, "fused": run_fused}
_default_backend = "fused"


def get_default_backend() -> str:
    return _default_backend


def set_default_backend(name: str) -> None:
    """Chooses the backend used when a layer does not name one."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; available: {sorted(BACKENDS)}")
    _default_backend = name


def torch_runs_stack(math: CellMath, x: Tensor, hidden: int, backend: str | None = None) -> bool:
    """True when the chosen backend hands this cell to torch's own fused op for every layer.

    A layer stack may then make one ``torch._VF`` call for all its layers and directions, as
    ``torch.nn`` does, instead of one per layer and direction (the per-call Python overhead is a
    few percent of a short sequence's time).
    """
    threads.adapt()  # (the one call per layer forward that every stack makes)
    if ((backend or _default_backend) != "fused" or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64)
            or torch.is_autocast_enabled("cpu")):  # (autocast: per layer, see run_layer)
        return False
    return fused.native_op(math, x, hidden) is not None


def run_layer(
    math: CellMath,
    x: Tensor,
    state0: State,
    params: Sequence[Tensor | None],
    batch_sizes: Ragged = None,
    backend: str | None = None,
    masks: StepMasks | None = None,
) -> tuple[Tensor, State]:
    """Runs one layer in one direction with the chosen (or default) backend.

    ``batch_sizes``: see :data:`rnnkit.engine.lengths.Ragged`; a tensor (traced graphs) only
    with the fused backend.

    ``masks``: the recurrent-dropout and zoneout masks of this layer and direction (None: none).

    ``x`` must have at least one step (as torch.nn requires); a batch of 0 rows gives empty
    outputs and states of the right shapes in every backend.
    """
    name = backend or _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; available: {sorted(BACKENDS)}")
    if precision.engine_autocast(math, name, x) == "float32":  # (warned once)
        with torch.autocast("cpu", enabled=False):
            return run_layer(math, x, state0, params, batch_sizes, backend, masks)
    check_steps("x", x.shape[0])
    if x.device.type == "cpu":
        threads.adapt()
    if isinstance(batch_sizes, Tensor) and name != "fused":  # (traced: lengths.Ragged)
        raise ValueError(f"lengths= is traced (torch.compile / torch.export) by the "
                         f"'fused' engine only, not the {name!r} one")
    # the input LN in Python (every backend but the fused kernels, which normalise it
    # themselves): over all T·B rows, so x's padding is zeroed first (NaN there would reach
    # dW_ih and dx through the LN's backward); the fused kernels never read the padding (the
    # fused engine zeroes it where it falls back to another path, run_fused)
    python_ln = math.layer_norm and not (name == "fused" and fused.normalises_input(math, x))
    if name != "fused" or python_ln:
        x = zero_padding(x, batch_sizes)
    if python_ln:
        # the input LN is per row and step: once for all T·B rows, here for every backend, under
        # autograd; the backends then get x = LN(x W_ih^T) and w_ih = None
        # (the fused backend's product: the float32 GEMM tiles of its layer-norm kernel). The
        # fused LSTM and GRU-after kernels apply it themselves, row by row in their loop
        # (fused.normalises_input).
        x, params = normalized_input(
            x, params, fused._layer_norm.project if name == "fused" else None)
    return BACKENDS[name](math, x, state0, params, batch_sizes, masks)


def run_step(
    math: CellMath,
    x_t: Tensor,
    state: State,
    params: Sequence[Tensor | None],
    backend: str | None = None,
) -> State:
    """One time step (B, I) of a cell: a layer of length 1, or — for inference with the fused
    backend — the fused ``step`` operator, the shortest path to the same kernel."""
    if ((backend or _default_backend) == "fused" and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x_t, *state, *params)))):
        new_state = fused.run_step(math, x_t, state, params)
        if new_state is not None:
            return new_state
    _, new_state = run_layer(math, x_t.unsqueeze(0), state, params, None, backend)
    return new_state


__all__ = ["BACKENDS", "get_default_backend", "run_layer", "run_step", "set_default_backend",
           "torch_runs_stack"]
