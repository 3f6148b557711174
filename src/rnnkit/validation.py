"""Input checks that turn a silent broadcast or a deep stack trace into an error naming the problem.

Every message says what was expected and what was given.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rnnkit.native import tracing

if TYPE_CHECKING:
    from rnnkit.cells.base import RecurrentCell, State


class ShapeError(ValueError, RuntimeError):
    """A tensor of the wrong shape (or no time steps): a ValueError, and also the RuntimeError
    ``torch.nn``'s recurrent layers and cells raise for the same input, so that a program
    written for torch.nn that catches it catches it here too."""


class DtypeError(TypeError, ValueError):
    """A tensor whose dtype differs from the parameters': a TypeError, and also the ValueError
    ``torch.nn``'s recurrent layers raise for the same input (see :class:`ShapeError`)."""


def check_float_tensor(name: str, tensor: Any, dtype: torch.dtype) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise DtypeError(
            f"{name} has dtype {tensor.dtype} but the parameters are {dtype}; "
            f"convert one of them (e.g. module.to({dtype}) or {name}.to({dtype}))"
        )


def check_features(name: str, tensor: Tensor, expected: int, what: str = "input_size") -> None:
    if tensor.shape[-1] != expected:
        raise ShapeError(
            f"{name} has {tensor.shape[-1]} features in its last dimension but {what} is "
            f"{expected} (shape given: {tuple(tensor.shape)})"
        )


def check_cell_input(
    cell: RecurrentCell, x_t: Tensor, state: State | Tensor | None
) -> tuple[Tensor, State | None]:
    """Validates one step's input and state; returns both with a batch dimension."""
    # (the parameters' dict, not getattr: a Module attribute costs ~0.5 µs, and a streaming step
    # at batch 1 takes ~20 µs in all)
    weight = cell._parameters.get("weight_ih")
    dtype = (weight if weight is not None else cell.weight_ih).dtype
    check_float_tensor("x_t", x_t, dtype)
    if x_t.dim() not in (1, 2):
        raise ValueError(
            f"x_t must be (batch, input_size) or (input_size,), got shape {tuple(x_t.shape)}"
        )
    check_features("x_t", x_t, cell.input_size)
    unbatched = x_t.dim() == 1
    if unbatched:
        x_t = x_t.unsqueeze(0)
    if state is None:
        return x_t, None
    if isinstance(state, Tensor):
        state = (state,)
    if any(isinstance(part, tuple) for part in state):
        # the state a torch.nn-style call site builds from what an rnnkit cell returned
        raise TypeError(
            f"{type(cell).__name__} got a nested tuple as its state. rnnkit's cells return "
            "`output, state` (LSTM: `output, LSTMState(h, c)`) where torch.nn's RNNCell/GRUCell "
            "return h and LSTMCell returns (h, c): write `h = cell(x, h)[0]`, or for an LSTM "
            "`_, (h, c) = cell(x, (h, c))`"
        )
    names = cell.math.state_names
    if len(state) != len(names):
        raise ValueError(
            f"{type(cell).__name__} expects a state of {len(names)} tensor(s) {names}, "
            f"got {len(state)}"
        )
    expected = (cell.hidden_size,) if unbatched else (x_t.shape[0], cell.hidden_size)
    checked = []
    for name, tensor in zip(names, state):
        check_float_tensor(f"state.{name}", tensor, dtype)
        if tensor.shape != expected:
            raise ShapeError(
                f"state.{name} must have shape {expected}, got {tuple(tensor.shape)}"
            )
        checked.append(tensor.unsqueeze(0) if unbatched else tensor)
    return x_t, cell.math.make_state(checked)


def check_steps(name: str, steps: int) -> None:
    """A sequence must have at least one step, as torch.nn's recurrent layers require."""
    if steps == 0:
        raise ShapeError(
            f"{name} has sequence length 0; a recurrent layer needs at least one time step "
            "(as torch.nn's layers do; a batch of size 0 is fine)"
        )


def check_sequence(name: str, x: Tensor, input_size: int, dtype: torch.dtype) -> None:
    """A padded sequence batch: (T, B, input_size), (B, T, input_size) or unbatched (T, input_size)."""
    check_float_tensor(name, x, dtype)
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be 3-D (seq_len, batch, input_size) — or (batch, seq_len, input_size) "
            f"with batch_first=True — or 2-D unbatched (seq_len, input_size); "
            f"got shape {tuple(x.shape)}"
        )
    check_features(name, x, input_size)


def integer_values(name: str, values: Sequence[int] | Tensor | Any) -> Tensor:
    """Integers given as a tensor, a NumPy array, a list or a tuple, as a 1-D CPU int64 tensor.

    Anything that is not an integer (a float, even 3.0, a bool, a string, NaN) is an error naming
    the first such entry: a silently truncated length would give a wrong answer, not an error.
    """
    if isinstance(values, Tensor) or hasattr(values, "__array__"):
        tensor = torch.as_tensor(values).detach()
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            flat = tensor.reshape(-1)
            offending = [i for i in range(flat.numel()) if tensor.dtype == torch.bool
                         or flat[i] != flat[i].round()] or [0]
            where = (f" ({name}[{offending[0]}] = {flat[offending[0]].item()!r})"
                     if flat.numel() else "")
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise TypeError(f"{name} must hold integers, got dtype {dtype}{where}")
        return tensor.to("cpu", torch.int64).reshape(-1) if tensor.dim() == 0 else tensor.to(
            "cpu", torch.int64)
    return torch.tensor(integer_list(name, values), dtype=torch.int64)


def integer_list(name: str, values: Any) -> list[int]:
    """A list or tuple of integers as Python ints (see :func:`integer_values`)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a tensor, a list or a tuple of integers, got {type(values).__name__}"
        )
    checked = []
    for i, value in enumerate(values):
        try:
            if isinstance(value, bool) or type(value).__name__ == "bool_":
                raise TypeError
            checked.append(operator.index(value))
        except TypeError:
            shown = repr(value) if isinstance(value, (str, bytes)) else str(value)
            raise TypeError(
                f"{name} must hold integers, but {name}[{i}] = {shown} is a "
                f"{type(value).__name__}"
            ) from None
    return checked


def check_lengths(
    lengths: Sequence[int] | Tensor, batch_size: int, max_length: int, device: torch.device
) -> Tensor:
    """Sequence lengths as a CPU int64 tensor, each in [1, max_length], one per batch row."""
    if isinstance(lengths, Tensor) and lengths.device.type not in ("cpu", device.type):
        raise ValueError(
            f"lengths is on device {lengths.device} but the input is on {device}; "
            "pass lengths on the CPU or on the input's device"
        )
    if tracing():  # torch.compile / torch.export: no data to read here
        return _traced_lengths(lengths, batch_size, max_length)
    lengths = integer_values("lengths", lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (batch,), got shape {tuple(lengths.shape)}")
    if lengths.numel() == 0 and batch_size > 0:
        raise ValueError("lengths is empty: there must be one length per sequence in the batch")
    if lengths.numel() != batch_size:
        raise _wrong_count(lengths.numel(), batch_size)
    check_length_values(lengths, max_length)
    return lengths


# the messages of check_lengths, shared by the eager check, the traced one and the operator
def _wrong_count(count: int, batch_size: int) -> ValueError:
    return ValueError(f"lengths has {count} entries but the batch has {batch_size} sequences")


def _too_short(row: int, value: int) -> ValueError:
    return ValueError(f"every length must be at least 1, but lengths[{row}] = {value}")


def _too_long(row: int, value: int, max_length: int) -> ValueError:
    return ValueError(f"lengths[{row}] = {value} is longer than the sequence dimension "
                      f"({max_length})")


def check_length_values(lengths: Tensor, max_length: int) -> None:
    """Every length in [1, max_length]; the error names the first row that is not (a length
    below 1 is named before one above max_length)."""
    if lengths.numel() == 0:
        return
    low, high = torch.aminmax(lengths)  # (one pass; the rows are looked for only on an error)
    if int(low) >= 1 and int(high) <= max_length:
        return
    too_short = (lengths < 1).nonzero().flatten()
    if too_short.numel():
        row = int(too_short[0])
        raise _too_short(row, int(lengths[row]))
    too_long = (lengths > max_length).nonzero().flatten()
    if too_long.numel():
        row = int(too_long[0])
        raise _too_long(row, int(lengths[row]), max_length)


def _traced_lengths(lengths: Sequence[int] | Tensor, batch_size: int, max_length: int) -> Tensor:
    """check_lengths inside a traced graph: what the metadata shows (type, dtype, shape) is checked
    now; the values, which a graph cannot read while it is built, by ``rnnkit::checked_lengths``
    when the graph runs — the same messages as in eager, never a silently wrong answer."""
    if not isinstance(lengths, Tensor):
        # (a list is fixed into the graph as constants: checked now, as in eager)
        return _checked_list(lengths, batch_size, max_length)
    lengths = check_lengths_metadata(lengths, batch_size)
    return torch.ops.rnnkit.checked_lengths(lengths.to("cpu", torch.int64), max_length)


def check_lengths_metadata(lengths: Tensor, batch_size: int) -> Tensor:
    """What a lengths tensor's metadata shows (dtype, shape, count; readable under fake tensors
    and while tracing), as check_lengths says it; returns it 1-D (one length: (1,))."""
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        dtype = str(lengths.dtype).removeprefix("torch.")
        raise TypeError(f"lengths must hold integers, got dtype {dtype}")
    if lengths.dim() == 0:  # one length, as integer_values reads it in eager
        lengths = lengths.reshape(1)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (batch,), got shape {tuple(lengths.shape)}")
    if lengths.shape[0] != batch_size:  # (shapes are known, or guarded on, while tracing)
        raise _wrong_count(lengths.shape[0], batch_size)
    return lengths


def _checked_list(lengths: Sequence[int], batch_size: int, max_length: int) -> Tensor:
    """A list of lengths checked as Python ints (a tensor's values cannot be read in a trace)."""
    values = integer_list("lengths", lengths)
    if len(values) != batch_size:
        raise _wrong_count(len(values), batch_size)
    # (in check_length_values' order: any length below 1 first)
    for row, value in enumerate(values):
        if value < 1:
            raise _too_short(row, value)
    for row, value in enumerate(values):
        if value > max_length:
            raise _too_long(row, value, max_length)
    return torch.tensor(values, dtype=torch.int64)


@torch.library.custom_op("rnnkit::checked_lengths", mutates_args=())
def checked_lengths(lengths: Tensor, max_length: int) -> Tensor:
    """A copy of ``lengths`` once every value is in [1, max_length], else check_lengths' error.

    An operator so that a traced graph (torch.compile, torch.export) checks the values where it
    runs; its result feeds the layer, so the check cannot be dropped from the graph.
    """
    # (_traced_lengths passes int64 (B,); a direct call with float or 2-D lengths returned them)
    if not isinstance(lengths, Tensor):  # (None raised "'NoneType' object has no attribute")
        raise ValueError("rnnkit::checked_lengths: lengths is None; an int64 (B,) tensor is "
                         "required")
    if lengths.dtype != torch.int64 or lengths.dim() != 1:
        raise ValueError("rnnkit::checked_lengths: lengths must be an int64 (B,) tensor, got "
                         f"{str(lengths.dtype).removeprefix('torch.')} of shape "
                         f"{tuple(lengths.shape)}")
    check_length_values(lengths, max_length)
    return lengths.clone()


@checked_lengths.register_fake
def _(lengths: Tensor, max_length: int) -> Tensor:
    return torch.empty_like(lengths)


def check_layer_state(
    name: str, state: Any, expected: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    check_float_tensor(name, state, dtype)
    if tuple(state.shape) != expected:
        raise ShapeError(
            f"{name} must have shape {expected} (num_layers * num_directions, batch, hidden_size)"
            f", got {tuple(state.shape)}"
        )
    if state.device != device:
        raise ValueError(f"{name} is on {state.device} but the input is on {device}")


def check_cell_sizes(input_size: int, hidden_size: int) -> None:
    """What every one-step cell's constructor requires of its sizes."""
    if input_size <= 0 or hidden_size <= 0:
        raise ValueError(
            f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}"
        )


def check_layer_arguments(input_size: int, hidden_size: int, num_layers: int, dropout: float) -> None:
    """What every layer's constructor requires of its sizes and its dropout."""
    if input_size <= 0 or hidden_size <= 0 or num_layers <= 0:
        raise ValueError(
            "input_size, hidden_size and num_layers must be positive, got "
            f"{input_size}, {hidden_size} and {num_layers}"
        )
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout}")


def check_proj_size(proj_size: int, hidden_size: int) -> None:
    """``torch.nn.LSTM``'s rule for ``proj_size``: 0 (no projection) or 0 < P < hidden_size."""
    if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
        raise ValueError(
            f"proj_size must be a non-negative integer (0 disables the projection), got {proj_size!r}")
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size must be smaller than hidden_size, got proj_size={proj_size} and "
            f"hidden_size={hidden_size}")
