"""Many independent streams through one recurrent model, stepped together in one batched call.

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
