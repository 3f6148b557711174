"""States are tensors, tuples or named tuples of tensors, nested for stacked cells; map over them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def map_state(fn: Callable[..., Tensor], *states: Any) -> Any:
    """Applies ``fn`` leaf by leaf to states of the same structure, keeping that structure."""
    first = states[0]
    if isinstance(first, Tensor):
        return fn(*states)
    parts = [map_state(fn, *children) for children in zip(*states)]
    if hasattr(first, "_fields"):  # a named tuple such as LSTMState
        return type(first)(*parts)
    return tuple(parts)


def first_leaf(state: Any) -> Tensor:
    """Any tensor of a state, e.g. to read its batch size or device."""
    while not isinstance(state, Tensor):
        state = state[0]
    return state
