"""Streams: one cell stepped input by input (:class:`Stream`), and many independent streams
through one recurrent model stepped together in one batched call (:class:`StreamBank`).

A :class:`Stream` is the batch-1 streaming step with as little as possible around the kernel:
it keeps the cell's weights packed for the step (once per weight version) and its state, and
each ``step(x)`` is one operator call::

    stream = Stream(rnnkit.LSTMCell(256, 256))
    for x_t in inputs:                       # x_t (1, 256)
        y_t = stream.step(x_t)               # (1, 256): the new h
    stream.state                             # LSTMState(h, c), batch 1

A unidirectional recurrent layer (or cell, or a model built on one) fed a sequence in chunks,
with the state carried from chunk to chunk, computes exactly what one call on the whole sequence
computes (``tests/test_streaming.py`` checks every cell variant, stacked, on every backend). So
a server can keep each stream's state between requests instead of re-running its history, and
step every live stream in one batched call::

    bank = StreamBank(model)                 # model(inputs (T, B, ...), state) -> (outputs, state)
    a, b = bank.add(), bank.add()
    out = bank.step([a, b], x)               # x (T, 2, ...): chunk of stream a, of stream b
    bank.reset(a)                            # a starts over from the zero state
    bank.drop(b)                             # b is gone

States are whatever the model carries (a tensor, or a tuple / named tuple of them, nested for
stacked cells): each stream's share is cut out along ``state_batch_dim`` (1 for layers, whose
states are (layers · directions, B, H); 0 for cells, whose states are (B, H)).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from rnnkit.native import builtin_operator
from rnnkit.state_tree import map_state

StepFunction = Callable[[Any, Any], tuple[Any, Any]]


class StreamBank:
    """The recurrent states of independent streams: add, step all at once, reset, drop."""

    def __init__(self, step: StepFunction, state_batch_dim: int = 1, input_batch_dim: int = 1
                 ) -> None:
        """``step(inputs, state) -> (outputs, state)``, with ``state=None`` meaning zeros (as
        ``torch.nn`` layers and rnnkit's models take it); the batch is on ``input_batch_dim`` of
        inputs and outputs and on ``state_batch_dim`` of every state tensor."""
        _refuse_bidirectional(step)
        self._step = step
        self.state_batch_dim, self.input_batch_dim = state_batch_dim, input_batch_dim
        self._states: dict[Hashable, Any] = {}  # None: not stepped since added or reset
        self._names = itertools.count()

    def add(self, key: Hashable | None = None, state: Any = None) -> Hashable:
        """A new stream (from the zero state, or ``state`` of batch size 1); returns its key."""
        if key is None:
            key = next(self._names)
            while key in self._states:
                key = next(self._names)
        elif key in self._states:
            raise KeyError(f"stream {key!r} already exists")
        self._states[key] = state
        return key

    def reset(self, key: Hashable) -> None:
        """Stream ``key`` starts over from the zero state."""
        self._check(key)
        self._states[key] = None

    def drop(self, key: Hashable) -> None:
        self._check(key)
        del self._states[key]

    def state(self, key: Hashable) -> Any:
        """Stream ``key``'s state (batch size 1), None while it is the zero state."""
        self._check(key)
        return self._states[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._states

    def __len__(self) -> int:
        return len(self._states)

    @property
    def keys(self) -> list[Hashable]:
        return list(self._states)

    def step(self, keys: Sequence[Hashable], inputs: Any) -> Any:
        """Feeds ``inputs`` (its batch entry i belongs to stream ``keys[i]``) to every named
        stream in one call of the model; each stream's state moves on, and the outputs return."""
        for key in keys:
            self._check(key)
        if len(set(keys)) != len(keys):
            raise ValueError("a stream appears twice in one step")
        outputs, state = self._step(inputs, self._gather(keys))
        dim = self.state_batch_dim
        for i, key in enumerate(keys):
            self._states[key] = map_state(lambda s, i=i: s.narrow(dim, i, 1), state)
        return outputs

    def _gather(self, keys: Sequence[Hashable]) -> Any:
        states = [self._states[key] for key in keys]
        known = [s for s in states if s is not None]
        if not known:
            return None  # every stream at the zero state: the model's own default
        zeros = map_state(torch.zeros_like, known[0])
        states = [zeros if s is None else s for s in states]
        return map_state(lambda *parts: torch.cat(parts, self.state_batch_dim), *states)

    def _check(self, key: Hashable) -> None:
        if key not in self._states:
            raise KeyError(f"no stream {key!r}")


def _refuse_bidirectional(step: StepFunction) -> None:
    """A bidirectional layer's output at step t reads the steps after t: chunk by chunk it would
    silently differ from one call on the whole sequence, so a module holding one is refused."""
    if not isinstance(step, torch.nn.Module):
        return  # (a plain function: nothing to inspect)
    for name, module in step.named_modules():
        if getattr(module, "bidirectional", False) is True:
            raise ValueError(f"{name or type(module).__name__} is bidirectional: its outputs read "
                             "the future of the sequence, so it cannot be stepped in chunks")


class Stream:
    """One recurrent cell (``rnnkit.RNNCell`` / ``LSTMCell`` / ``GRUCell``, any variant) stepped
    one input at a time at batch 1, its state kept between steps. Inference only: nothing is
    differentiated, and ``step`` returns ``cell(x, state)``'s output without a gradient.

    Where the fused kernel runs (float32, the fused backend, a CPU with AVX2 + FMA, one thread)
    a step is one call of ``rnnkit_fused::step_stream`` with four arguments: the input, the
    state and the cell's weights packed into one tensor (``pack_step``), kept here. Before each
    step the stream compares the cell's parameters with the ones it packed — their storage and
    version counters — and the process's optimizer steps: an in-place change,
    ``load_state_dict``, an optimizer step, ``.data =``, a new ``Parameter`` or ``.double()``
    re-packs them (or hands the step to the cell). A write through ``.data``
    (``p.data.add_(...)``) bumps no version and is not seen by a stream made before it (checking
    the values at every step would cost a third of the step): make a new ``Stream`` after one.
    Everywhere else ``step`` calls the cell itself (same results, its speed).
    """

    def __init__(self, cell: torch.nn.Module, state: Any = None) -> None:
        """``state``: the cell's state for batch 1 to start from (default: zeros)."""
        from rnnkit.cells.base import RecurrentCell
        from rnnkit.engine.fused import _build, inference

        if not isinstance(cell, RecurrentCell):  # (its math, state type and zero state)
            raise TypeError(f"Stream takes an rnnkit RNNCell, LSTMCell or GRUCell, got "
                            f"{type(cell).__name__} (StreamBank steps any model)")
        self.cell = cell
        self._inference = inference
        self._lstm = len(cell.math.state_names) == 2
        self._packed: Tensor | None = None
        self._weights: list[tuple[int, int]] = []
        weight = cell._parameters.get("weight_hh")
        if (weight is not None and weight.dtype == torch.float32 and weight.is_cpu
                and _build.load() is not None and inference._config(cell) is not None
                and inference._one_thread()):
            self._repack()
        self.reset(state)

    def _repack(self) -> None:
        """The cell's current weights packed for the step (None: ``step`` calls the cell)."""
        inference = self._inference
        self._steps = inference._optimizer_steps
        self._weights = self._weights_now()
        config = inference._config(self.cell)  # (None: the backend or the math changed since)
        with torch.no_grad():
            plan = (inference._plan(self.cell, config, inference._cell_params)
                    if config is not None else None)
            packed = inference.step_weights(plan) if plan is not None else None
        self._packed = packed if packed is not None and packed.numel() else None
        self._op = builtin_operator("rnnkit_fused::step_stream")

    def _weights_now(self) -> list[tuple[int, int]]:
        """What identifies the weights packed: each parameter's storage and version (a new
        Parameter, ``.data =`` or a dtype change moves the storage; an in-place change bumps
        the version). A list, not a generator: one step's Python is a few µs."""
        return [(p.data_ptr(), p._version) for p in self.cell._parameters.values()
                if p is not None]

    def reset(self, state: Any = None) -> None:
        """Start over from ``state`` (batch 1; default: the zero state)."""
        if state is None:
            state = self.cell.zero_state(1)
        parts = tuple(state) if isinstance(state, tuple) else (state,)
        dtype = self.cell.weight_hh.dtype
        if len(parts) != (2 if self._lstm else 1) or any(
                not isinstance(p, Tensor) or p.shape != (1, self.cell.hidden_size)
                or p.dtype != dtype for p in parts):
            raise ValueError(f"Stream: state must be the cell's state for batch 1: "
                             f"{'(h, c)' if self._lstm else 'h'}, each (1, {self.cell.hidden_size}) "
                             f"of the weights' dtype {dtype}")
        self._h = parts[0].detach()
        self._c = parts[1].detach() if self._lstm else None

    @property
    def state(self) -> Any:
        """The state after the last step (the cell's state type, batch 1)."""
        return self.cell.math.make_state((self._h, self._c) if self._lstm else (self._h,))

    def step(self, x: Tensor) -> Tensor:
        """Feeds ``x`` (1, input_size); returns the output (1, hidden_size), the new h."""
        packed = self._packed
        if packed is None:
            return self._step_cell(x)
        if (self._inference._optimizer_steps != self._steps
                or self._weights_now() != self._weights):
            self._repack()
            return self.step(x)
        try:
            if x.requires_grad:  # (else every step would chain into one autograd graph)
                x = x.detach()
            h, c = self._op(x, self._h, self._c, packed)
        except (RuntimeError, AttributeError, TypeError):  # (the operator checks its arguments)
            if isinstance(x, Tensor) and x.shape == (1, self.cell.input_size) and x.is_cpu:
                raise ValueError(f"Stream.step: x must be float32 (the weights' dtype), got "
                                 f"{x.dtype}") from None
            raise ValueError(f"Stream.step: x must be a (1, {self.cell.input_size}) CPU tensor, "
                             f"got {_describe(x)}") from None
        self._h = h
        if self._lstm:
            self._c = c
        return h

    def _step_cell(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.shape != (1, self.cell.input_size):
            raise ValueError(f"Stream.step: x must be a (1, {self.cell.input_size}) tensor, got "
                             f"{_describe(x)}")
        with torch.no_grad():
            output, state = self.cell(x, self.state)
        self.reset(state)
        return output


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} {tuple(x.shape)} on {x.device}"
    return type(x).__name__
