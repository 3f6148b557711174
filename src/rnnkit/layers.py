"""Sequence layers that drop in for ``torch.nn.RNN``, ``torch.nn.LSTM`` and ``torch.nn.GRU``.

Same constructor arguments, parameter names, shapes, state layout and return values as
``torch.nn``; in addition every cell variant of :mod:`rnnkit.cells` (peephole and coupled-gate LSTM,
the reset-before GRU, the sigmoid Elman RNN) and ``lengths=`` as an alternative to packing.

Stacking, direction, lengths and dropout are handled here for every cell alike; the time loop is
the engine's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.cells.base import CellMath, pickle_state, unpickle_state
from rnnkit.cells.elman import ElmanMath
from rnnkit.cells.gru import gru_math
from rnnkit.cells.lstm import forget_bias_vectors, init_forget_bias, lstm_math
from rnnkit.cells.minimal import MinGRUMath, MinimalMath, MinLSTMMath, pickle_minimal, unpickle_minimal
from rnnkit.engine import run_layer, torch_runs_stack
from rnnkit.engine.lengths import batch_sizes_for, reverse_within_lengths, sort_by_length
from rnnkit.engine.scan import minimal_layer_scan
from rnnkit.validation import (
    check_layer_arguments,
    check_layer_state,
    check_lengths,
    check_sequence,
    check_steps,
)


class RecurrentLayer(nn.Module):
    """A stack of recurrent layers, optionally bidirectional, for any cell family."""

    torch_class: type[nn.Module]

    def __init__(
        self,
        math_: CellMath,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_layer_arguments(input_size, hidden_size, num_layers, dropout)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout acts between stacked layers only (as in torch.nn); with num_layers=1 "
                f"dropout={dropout} has no effect",
                stacklevel=3,
            )
        self.math = math_
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.backend = backend
        self.proj_size = 0  # read by code written for torch.nn.LSTM
        rows = math_.num_gates * hidden_size
        self._param_names: list[list[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {
                    "weight_ih": (rows, layer_input),
                    "weight_hh": (rows, hidden_size),
                }
                if bias and math_.has_bias_vectors:
                    shapes.update(bias_ih=(rows,), bias_hh=(rows,))
                shapes.update({name: (math_.diagonal_size(name, hidden_size),)
                               for name in math_.diagonal_names})
                names = []
                for base, shape in shapes.items():
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape)))
                    names.append(base + suffix)
                self._param_names.append(names)
        self.reset_parameters()

    def __getstate__(self) -> dict[str, Any]:
        return pickle_state(super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(unpickle_state(state))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """Uniform(-1/√H, 1/√H), as ``torch.nn`` initialises its recurrent layers."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        initial = getattr(self.math, "initial_value", None)  # (MinimalMath has none)
        for name, weight in self.named_parameters():
            value = initial(name) if initial else None  # (layer-norm gains 1, biases 0)
            if value is None:
                nn.init.uniform_(weight, -bound, bound)
            else:
                nn.init.constant_(weight, value)

    def flatten_parameters(self) -> None:
        """Nothing to do (kept so code written for ``torch.nn.LSTM`` runs unchanged)."""

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [[getattr(self, name) for name in names] for names in self._param_names]

    def layer_params(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """``(w_ih, w_hh, b_ih, b_hh, *diagonal)`` of one layer and direction (the engine's order)."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        weights = [getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)]
        if self.bias and self.math.has_bias_vectors:
            weights += [getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix)]
        else:
            weights += [None, None]
        weights += [getattr(self, name + suffix) for name in self.math.diagonal_names]
        return tuple(weights)

    # --- forward ---------------------------------------------------------------------------

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | tuple[Tensor, Tensor] | None = None,
        lengths: Sequence[int] | Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, Any]:
        """``output, h_n = layer(input, hx)`` (LSTM: ``output, (h_n, c_n)``), as ``torch.nn``.

        ``input`` is (T, B, I) — (B, T, I) with ``batch_first`` — or unbatched (T, I), or a
        ``PackedSequence``. ``lengths`` (B,) marks the real length of each padded sequence: the
        final state is taken at that length and outputs past it are zero.
        """
        x, lengths, packed, unbatched = self._time_major(input, lengths,
                                                         self._parameters["weight_hh_l0"].dtype)
        steps, batch = x.shape[0], x.shape[1]
        check_steps("input", steps)
        states0 = self._initial_states(hx, batch, unbatched, x)
        if (lengths is None and (self.dropout == 0 or not self.training or self.num_layers == 1)
                and torch_runs_stack(self.math, x, self.hidden_size, self.backend)):
            return self._format_output(*self._torch_stack(x, states0), packed, lengths, unbatched)

        sorted_lengths = order = inverse = batch_sizes = None
        if lengths is not None:
            lengths = check_lengths(lengths, batch, steps, x.device)
            sorted_lengths, order, inverse = sort_by_length(lengths)
            batch_sizes = batch_sizes_for(sorted_lengths, steps)
            x = x[:, order.to(x.device)]
            states0 = [s[:, order.to(x.device)] for s in states0]

        layer_input = x.contiguous()
        finals: list[list[Tensor]] = [[] for _ in states0]
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                state0 = tuple(s[index] for s in states0)
                source = layer_input
                if direction == 1:
                    source = reverse_within_lengths(layer_input, sorted_lengths).contiguous()
                out, final = run_layer(
                    self.math, source, state0, self.layer_params(layer, direction),
                    batch_sizes, self.backend,
                )
                if direction == 1:
                    out = reverse_within_lengths(out, sorted_lengths)
                outputs.append(out)
                for collected, value in zip(finals, final):
                    collected.append(value)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

        output = layer_input
        final_states = [torch.stack(values) for values in finals]  # (L*D, B, H) each
        if inverse is not None:
            output = output[:, inverse.to(x.device)]
            final_states = [s[:, inverse.to(x.device)] for s in final_states]
        return self._format_output(output, final_states, packed, lengths, unbatched)

    def _time_major(self, input: Tensor | PackedSequence, lengths: Sequence[int] | Tensor | None,
                    dtype: torch.dtype) -> tuple[Tensor, Any, PackedSequence | None, bool]:
        """The input as a checked (T, B, I) tensor, its lengths (from a PackedSequence too), the
        PackedSequence it came as (or None) and whether it was unbatched."""
        packed = input if isinstance(input, PackedSequence) else None
        if packed is not None:
            if lengths is not None:
                raise ValueError("pass either a PackedSequence or lengths=, not both")
            x, lengths = pad_packed_sequence(packed)
            check_sequence("input", x, self.input_size, dtype)
            return x, lengths, packed, False
        check_sequence("input", input, self.input_size, dtype)
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else input
        if self.batch_first and not unbatched:
            x = x.transpose(0, 1)
        return x, lengths, None, unbatched

    def _torch_stack(self, x: Tensor, states0: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Every layer and direction in one call of torch's own op (see ``torch_runs_stack``)."""
        parameters = self._parameters  # (getattr on a Module costs a microsecond per name)
        weights = [parameters[name] for names in self._param_names for name in names]
        output, *final_states = torch._VF.lstm(
            x, tuple(states0), weights, self.bias, self.num_layers, 0.0, self.training,
            self.bidirectional, False)
        return output, final_states

    def _initial_states(
        self, hx: Any, batch: int, unbatched: bool, x: Tensor
    ) -> list[Tensor]:
        """The initial states as (L*D, B, H) tensors, zeros where ``hx`` is None."""
        names = self.math.state_names
        depth = self.num_layers * self.num_directions
        if hx is None:
            zeros = x.new_zeros(depth, batch, self.hidden_size)
            return [zeros] * len(names)
        given = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        if len(given) != len(names):
            kind = type(self).__name__
            expected = "a tuple (h_0, c_0)" if len(names) == 2 else "a single tensor h_0"
            raise ValueError(f"{kind} expects hx to be {expected}, got {len(given)} tensor(s)")
        shape = (depth, self.hidden_size) if unbatched else (depth, batch, self.hidden_size)
        states = []
        for name, state in zip(names, given):
            check_layer_state(f"hx {name}_0", state, shape, x.dtype, x.device)
            states.append(state.unsqueeze(1) if unbatched else state)
        return states

    def _format_output(
        self,
        output: Tensor,
        final_states: list[Tensor],
        packed: PackedSequence | None,
        lengths: Tensor | None,
        unbatched: bool,
    ) -> tuple[Tensor | PackedSequence, Any]:
        if packed is not None:
            assert lengths is not None
            order = packed.sorted_indices
            if order is not None:
                output, lengths = output[:, order], lengths[order.cpu()]
            data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
            result: Tensor | PackedSequence = PackedSequence(
                data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
            )
        elif unbatched:
            result = output.squeeze(1)
            final_states = [s.squeeze(1) for s in final_states]
        else:
            result = output.transpose(0, 1) if self.batch_first else output
        if len(final_states) == 1:
            return result, final_states[0]
        return result, tuple(final_states)

    # --- torch.nn interop ------------------------------------------------------------------

    def _torch_kwargs(self) -> dict[str, Any]:
        return dict(
            input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
            bidirectional=self.bidirectional,
        )

    def _torch_compatibility_problem(self) -> str | None:
        return None

    def to_torch(self) -> nn.Module:
        """The equivalent ``torch.nn`` module with the same weights (standard variants only)."""
        problem = self._torch_compatibility_problem()
        if problem:
            raise ValueError(f"{type(self).__name__} cannot become a {self.torch_class.__name__}: "
                             f"{problem}")
        module = self.torch_class(**self._torch_kwargs())
        module.load_state_dict(self.state_dict())
        return module.to(self.weight_hh_l0.dtype)

    @classmethod
    def _check_torch_module(cls, module: nn.Module) -> None:
        if not isinstance(module, cls.torch_class):
            raise TypeError(
                f"{cls.__name__}.from_torch expects a torch.nn.{cls.torch_class.__name__}, "
                f"got {type(module).__name__}"
            )
        if getattr(module, "proj_size", 0):
            raise ValueError("LSTM projections (proj_size > 0) are not supported")

    def _load_torch_weights(self, module: nn.Module) -> RecurrentLayer:
        with torch.no_grad():
            for name, value in module.state_dict().items():
                getattr(self, name).copy_(value)
        return self.to(module.weight_hh_l0.dtype)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text + f", cell={self.math!r}"


class RNN(RecurrentLayer):
    """Elman RNN layers (``torch.nn.RNN``), with ``nonlinearity`` in tanh, relu or sigmoid."""

    torch_class = nn.RNN

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1,
        nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, bidirectional: bool = False, backend: str | None = None,
    ) -> None:
        self.nonlinearity = nonlinearity
        super().__init__(ElmanMath(nonlinearity), input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, backend)

    def _torch_kwargs(self) -> dict[str, Any]:
        return {**super()._torch_kwargs(), "nonlinearity": self.nonlinearity}

    def _torch_compatibility_problem(self) -> str | None:
        if self.nonlinearity == "sigmoid":
            return "torch.nn.RNN has no sigmoid nonlinearity"
        return None

    @classmethod
    def from_torch(cls, module: nn.RNN, backend: str | None = None) -> RNN:
        """An exact copy of a ``torch.nn.RNN``."""
        cls._check_torch_module(module)
        layer = cls(module.input_size, module.hidden_size, module.num_layers,
                    module.nonlinearity, module.bias, module.batch_first, module.dropout,
                    module.bidirectional, backend)
        return layer._load_torch_weights(module)


class LSTM(RecurrentLayer):
    """LSTM layers (``torch.nn.LSTM``), with ``peephole`` and ``coupled`` (CIFG) variants.

    ``forget_bias`` sets the initial total forget-gate bias (TensorFlow uses 1.0);
    ``layer_norm=True`` is the layer-normalised LSTM (:mod:`rnnkit.cells.layer_norm`).
    """

    torch_class = nn.LSTM

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        peephole: bool = False, coupled: bool = False, forget_bias: float | None = None,
        backend: str | None = None, layer_norm: bool = False,
    ) -> None:
        self.peephole = peephole
        self.coupled = coupled
        self.forget_bias = forget_bias
        self.layer_norm = layer_norm
        super().__init__(lstm_math(peephole, coupled, layer_norm, bias), input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional, backend)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.forget_bias is None:
            return
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                if not self.bias:
                    raise ValueError("forget_bias needs bias=True")
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                init_forget_bias(*forget_bias_vectors(self, suffix), self.hidden_size,
                                 self.coupled, self.forget_bias)

    def _torch_compatibility_problem(self) -> str | None:
        if self.peephole or self.coupled:
            return "torch.nn.LSTM has neither peephole connections nor coupled gates"
        if self.layer_norm:
            return "torch.nn.LSTM has no layer normalisation"
        return None

    @classmethod
    def from_torch(cls, module: nn.LSTM, backend: str | None = None) -> LSTM:
        """An exact copy of a ``torch.nn.LSTM`` (without projections)."""
        cls._check_torch_module(module)
        layer = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                    module.batch_first, module.dropout, module.bidirectional, backend=backend)
        return layer._load_torch_weights(module)


class GRU(RecurrentLayer):
    """GRU layers (``torch.nn.GRU``); ``reset="before"`` is the original form of Cho et al. 2014;
    ``layer_norm=True`` is the layer-normalised GRU (:mod:`rnnkit.cells.layer_norm`)."""

    torch_class = nn.GRU

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        reset: str = "after", backend: str | None = None, layer_norm: bool = False,
    ) -> None:
        self.reset = reset
        self.layer_norm = layer_norm
        super().__init__(gru_math(reset, layer_norm, bias), input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, backend)

    def _torch_compatibility_problem(self) -> str | None:
        if self.reset != "after":
            return 'torch.nn.GRU is the reset="after" form'
        if self.layer_norm:
            return "torch.nn.GRU has no layer normalisation"
        return None

    @classmethod
    def from_torch(cls, module: nn.GRU, backend: str | None = None) -> GRU:
        """An exact copy of a ``torch.nn.GRU``."""
        cls._check_torch_module(module)
        layer = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                    module.batch_first, module.dropout, module.bidirectional, backend=backend)
        return layer._load_torch_weights(module)


class MinimalLayer(RecurrentLayer):
    """Stacked minGRU / minLSTM layers (:mod:`rnnkit.cells.minimal`) run by a parallel scan.

    The same call as the other layers — ``output, h_n = layer(input, hx, lengths=...)``, input
    (T, B, I) or batch-first or unbatched or packed, ``h_n`` (L·D, B, H) — but each layer and
    direction is one scan over all time steps (:func:`~rnnkit.engine.scan.linear_recurrence_scan`)
    instead of a loop, because no gate reads ``h_{t−1}``. Parameters: ``weight_ih_l{k}`` and
    ``bias_ih_l{k}`` (``_reverse`` for the backward direction); there is no recurrent weight.
    """

    def __init__(
        self, math_: MinimalMath, input_size: int, hidden_size: int, num_layers: int = 1,
        bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
        bidirectional: bool = False, backend: str = "auto",
    ) -> None:
        nn.Module.__init__(self)
        check_layer_arguments(input_size, hidden_size, num_layers, dropout)
        self.math = math_
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        self.backend = backend  # "auto": the C++ scan where it runs, "log": the log-space scan
        self.proj_size = 0
        rows = math_.num_gates * hidden_size
        self._param_names = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                names = ["weight_ih" + suffix]
                setattr(self, names[0], nn.Parameter(torch.empty(rows, layer_input)))
                if bias:
                    names.append("bias_ih" + suffix)
                    setattr(self, names[1], nn.Parameter(torch.empty(rows)))
                self._param_names.append(names)
        self.reset_parameters()

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | None = None,
        lengths: Sequence[int] | Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        x, lengths, packed, unbatched = self._time_major(input, lengths, self.weight_ih_l0.dtype)
        steps, batch = x.shape[0], x.shape[1]
        check_steps("input", steps)  # as every rnnkit layer (and torch.nn): T = 0 is an error
        (h0,) = self._initial_states(hx, batch, unbatched, x)
        if lengths is not None:
            lengths = check_lengths(lengths, batch, steps, x.device)
        layer_input, finals = x, []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                names = self._param_names[index]
                weight = self._parameters[names[0]]
                bias = self._parameters[names[1]] if self.bias else None
                source = layer_input if direction == 0 else reverse_within_lengths(layer_input, lengths)
                gx = F.linear(source, weight, bias)  # (T, B, G·H)
                out, final = minimal_layer_scan(self.math, gx, h0[index], lengths, self.backend)
                outputs.append(out if direction == 0 else reverse_within_lengths(out, lengths))
                finals.append(final)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return self._format_output(layer_input, [torch.stack(finals)], packed, lengths, unbatched)

    def to_torch(self) -> nn.Module:
        raise ValueError(f"{type(self).__name__} has no torch.nn counterpart")

    def __getstate__(self) -> dict[str, Any]:
        return pickle_minimal(nn.Module.__getstate__(self))

    def __setstate__(self, state: dict[str, Any]) -> None:
        nn.Module.__setstate__(self, unpickle_minimal(state))

    def extra_repr(self) -> str:
        return super().extra_repr().replace(f", cell={self.math!r}", f", cell={self.math.kind}")


class MinGRU(MinimalLayer):
    """minGRU layers (Feng et al. 2024), trained by a parallel scan over time."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(MinGRUMath(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, backend)


class MinLSTM(MinimalLayer):
    """minLSTM layers (Feng et al. 2024), trained by a parallel scan over time."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(MinLSTMMath(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, backend)
