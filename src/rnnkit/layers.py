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
from torch.nn.utils.parametrizations import orthogonal as parametrize_orthogonal
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.cells.base import (
    CellMath,
    gate_bias_vectors,
    init_chrono,
    pickle_state,
    unpickle_state,
    weight_dtype,
)
from rnnkit.cells.elman import ElmanMath
from rnnkit.cells.gru import gru_math
from rnnkit.cells.lstm import init_forget_bias, lstm_math
from rnnkit.cells.minimal import MinGRUMath, MinimalMath, MinLSTMMath, pickle_minimal, unpickle_minimal
from rnnkit.engine import run_layer, torch_runs_stack
from rnnkit.engine.fused import inference as lean_inference
from rnnkit.engine.lengths import (
    every_row_runs,
    reversal_rows,
    reverse_rows,
    reverse_within_lengths,
    sort_by_length,
    sort_rows,
    torch_order,
)
from rnnkit.engine.precision import layer_autocast
from rnnkit.engine.regularise import check_rate, drop_input, drop_weight, recurrent_masks
from rnnkit.engine.scan import minimal_layer
from rnnkit.native import tracing
from rnnkit.validation import (
    check_layer_arguments,
    check_layer_state,
    check_lengths,
    check_proj_size,
    check_sequence,
    check_steps,
)


class RecurrentLayer(nn.Module):
    """A stack of recurrent layers, optionally bidirectional, for any cell family.

    Regularisers of every cell family (keyword-only; equations in :mod:`rnnkit.engine.regularise`),
    each combinable with the others, stacking, ``bidirectional`` and ``lengths=``:

    * ``recurrent_dropout`` p: one mask per sequence on the h_{t-1} that W_hh multiplies
      (Gal & Ghahramani 2016; Keras's name): ``pre_t = W_ih x_t + W_hh (h_{t-1} ⊙ m_h) + b``;
    * ``input_dropout`` p: one mask per sequence on each layer's input, ``x_t ⊙ m_x``;
    * ``zoneout`` z (and ``zoneout_cell`` z_c for the LSTM's c, default z): each unit keeps its
      previous value with probability z per step, ``h_t = k ⊙ h_{t-1} + (1 − k) ⊙ h̃_t``
      (Krueger et al. 2017); at evaluation k = z;
    * ``weight_drop`` p: DropConnect on W_hh, one mask per forward pass, ``W_hh ⊙ M``
      (Wan et al. 2013, Merity et al. 2018).

    ``dropout`` keeps torch.nn's meaning: fresh dropout on the outputs between stacked layers.
    Masks come from torch's RNG in this layer, so a seed fixes them in every engine.

    ``chrono`` T_max (keyword-only; LSTM, GRU, minGRU, minLSTM): the chrono initialisation of
    the gate biases (Tallec & Ollivier 2018) for dependencies up to about T_max steps — each
    unit's keep-gate bias ``log u``, ``u ~ U[1, T_max − 1]`` (LSTM: ``b_f = log u``,
    ``b_i = −b_f``), drawn per layer and direction after the uniform initialisation
    (:func:`rnnkit.cells.base.init_chrono`). Only the starting point changes: the math, and
    the conversion to and from torch.nn, are those of the plain layer.
    """

    torch_class: type[nn.Module]
    # the regularisers' rates; class defaults so that layers without them (MinimalLayer) and
    # layers pickled before they existed read "none"
    recurrent_dropout: float = 0.0
    input_dropout: float = 0.0
    zoneout: float = 0.0
    zoneout_cell: float | None = None
    weight_drop: float = 0.0
    chrono: float | None = None  # (a class default: layers pickled before it existed)

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
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recurrent_dropout: float = 0.0,
        input_dropout: float = 0.0,
        zoneout: float = 0.0,
        zoneout_cell: float | None = None,
        weight_drop: float = 0.0,
        chrono: float | None = None,
    ) -> None:
        super().__init__()
        check_layer_arguments(input_size, hidden_size, num_layers, dropout)
        self.chrono = chrono
        check_proj_size(proj_size, hidden_size)
        if math_.spec.projection != (proj_size > 0):
            raise ValueError(f"proj_size={proj_size} does not match the cell {math_!r} (only an "
                             "LSTM has a projection: LSTMMath(projection=True) with proj_size > 0)")
        factory_kwargs = {"device": device, "dtype": dtype}  # as torch.nn's factory arguments
        self.recurrent_dropout = check_rate("recurrent_dropout", recurrent_dropout)
        self.input_dropout = check_rate("input_dropout", input_dropout)
        self.zoneout = check_rate("zoneout", zoneout)
        if zoneout_cell is not None and math_.state_names != ("h", "c"):
            raise ValueError("zoneout_cell is the LSTM cell state's rate; this cell has no c")
        self.zoneout_cell = check_rate("zoneout_cell", zoneout_cell)
        self.weight_drop = check_rate("weight_drop", weight_drop)
        if proj_size > 0 and (recurrent_dropout or zoneout or zoneout_cell):
            raise ValueError("recurrent_dropout and zoneout are not implemented with proj_size > 0 "
                             "(weight_drop and input_dropout are)")
        if math_.layer_norm and (recurrent_dropout or zoneout or zoneout_cell):
            raise ValueError("recurrent_dropout and zoneout are not implemented with layer_norm=True "
                             "(weight_drop and input_dropout are)")
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
        self.proj_size = proj_size  # LSTM only (torch.nn.LSTM's); 0 everywhere else
        output_size = self.output_size
        rows = math_.num_gates * hidden_size
        self._param_names: list[list[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else output_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {
                    "weight_ih": (rows, layer_input),
                    "weight_hh": (rows, output_size),
                }
                if bias and math_.has_bias_vectors:
                    shapes.update(bias_ih=(rows,), bias_hh=(rows,))
                if proj_size:  # torch.nn.LSTM's order: weight_hr after the biases
                    shapes.update(weight_hr=(proj_size, hidden_size))
                shapes.update({name: (math_.diagonal_size(name, hidden_size),)
                               for name in math_.diagonal_names})
                names = []
                for base, shape in shapes.items():
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(base + suffix)
                self._param_names.append(names)
        self.reset_parameters()

    def __getstate__(self) -> dict[str, Any]:
        return pickle_state(super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(unpickle_state(state))

    @property
    def regularisers(self) -> dict[str, float]:
        """The regularisers in use, by name (empty for none)."""
        values = {"recurrent_dropout": self.recurrent_dropout,
                  "input_dropout": self.input_dropout, "zoneout": self.zoneout,
                  "zoneout_cell": self.zoneout_cell, "weight_drop": self.weight_drop}
        return {name: value for name, value in values.items() if value}

    def _regularised_now(self) -> bool:
        """True when a regulariser changes this forward (zoneout also at evaluation)."""
        return bool(self.zoneout or self.zoneout_cell) or (self.training and bool(
            self.recurrent_dropout or self.input_dropout or self.weight_drop))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """The width of h (and of each direction's output): ``proj_size`` if set, else hidden."""
        return self.proj_size or self.hidden_size

    def reset_parameters(self) -> None:
        """Uniform(-1/√H, 1/√H), as ``torch.nn`` initialises its recurrent layers; then the
        chrono gate biases if ``chrono`` is set."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        initial = getattr(self.math, "initial_value", None)  # (MinimalMath has none)
        for name, weight in self.named_parameters():
            value = initial(name) if initial else None  # (layer-norm gains 1, biases 0)
            if value is None:
                nn.init.uniform_(weight, -bound, bound)
            else:
                nn.init.constant_(weight, value)
        if self.chrono is None:
            return
        for names in self._param_names:
            suffix = names[0].removeprefix("weight_ih")  # "_l{k}" or "_l{k}_reverse"
            init_chrono(self.math.chrono_gates, *gate_bias_vectors(self, suffix), self.hidden_size,
                        self.chrono)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this on every module it compiles: one error naming the
        way out, instead of TorchScript's complaint about a type annotation deep in rnnkit."""
        way_out = ("layer.to_torch() is the torch.nn module with the same weights"
                   if type(self).to_torch is RecurrentLayer.to_torch
                   else f"{type(self).__name__} has no torch.nn counterpart")
        raise RuntimeError(f"rnnkit.{type(self).__name__} cannot be compiled by torch.jit.script "
                           f"(TorchScript cannot read rnnkit's Python or its C++ operators); "
                           f"{way_out}")

    def _weights_are_parameters(self) -> bool:
        """False when a weight is not a registered parameter but computed from one on each call
        (``torch.nn.utils.prune``, ``weight_norm``, ``parametrize``, AWD-LSTM's WeightDrop)."""
        names = self.__dict__.get("_weight_names")  # (every name, flat: made once, ~1 µs)
        if names is None:
            names = self.__dict__["_weight_names"] = tuple(
                name for names in self._param_names for name in names)
        return all(map(self._parameters.__contains__, names))

    @property
    def mode(self) -> str:
        """``torch.nn``'s name of the cell: "LSTM", "GRU", "RNN_TANH", "RNN_RELU" (rnnkit's own
        variants: "RNN_SIGMOID"; a peephole LSTM is still "LSTM")."""
        if self.math.kind == "rnn":
            return f"RNN_{self.math.nonlinearity.upper()}"
        return self.math.kind.upper()

    def flatten_parameters(self) -> None:
        """Nothing to do (kept so code written for ``torch.nn.LSTM`` runs unchanged)."""

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [[getattr(self, name) for name in names] for names in self._param_names]

    def layer_params(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """``(w_ih, w_hh, b_ih, b_hh, *extra)`` of one layer and direction (the engine's order;
        ``extra`` is the math's ``extra_weight_names``: diagonal weights, then ``weight_hr``)."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        parameters = self._parameters  # (getattr on a Module costs ~0.5 µs per name; a
        # parametrized weight is not in the dict: getattr finds it)
        get = lambda name: parameters[name] if name in parameters else getattr(self, name)  # noqa: E731
        weights = [get("weight_ih" + suffix), get("weight_hh" + suffix)]
        if self.bias and self.math.has_bias_vectors:
            weights += [get("bias_ih" + suffix), get("bias_hh" + suffix)]
        else:
            weights += [None, None]
        weights += [get(name + suffix) for name in self.math.extra_weight_names]
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

        Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the layer runs in mixed precision
        (bf16 GEMM inputs, float32 accumulation, state and weights) and returns what torch.nn
        returns under CPU autocast: bfloat16 output and states for RNN and LSTM, float32 for
        GRU (:mod:`rnnkit.engine.precision`).
        """
        # inference: the lean path (engine/fused/inference.py), whose plans cache packed copies
        # of the parameters; a weight computed on each call (pruning, weight norm, AWD-LSTM's
        # WeightDrop) would be stale there
        if not torch.is_grad_enabled() and self._weights_are_parameters():
            result = lean_inference.layer_forward(self, input, hx, lengths)
            if result is not None:
                return result
        # CPU autocast: a bf16 input or state is read as float32, out_dtype is what torch.nn
        # returns (rnnkit.engine.precision)
        dtype = weight_dtype(self)
        input, hx, out_dtype = layer_autocast(input, hx, dtype, self.math.kind)
        x, lengths, packed, unbatched = self._time_major(input, lengths, dtype)
        steps, batch = x.shape[0], x.shape[1]
        check_steps("input", steps)
        states0 = self._initial_states(hx, batch, unbatched, x)
        if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
            self._check_legacy_onnx_export(packed, lengths)  # (torch's op: torch's ONNX node)
            return self._format_output(*self._torch_stack(x, states0), None, None, unbatched,
                                       out_dtype)
        # dropout between layers: the rows' order decides which row gets which mask (torch.nn's
        # order, below, for any lengths; torch's op draws none of them)
        tied_dropout = self.dropout > 0 and self.training and self.num_layers > 1
        traced = tracing()
        values = None  # (eager: the checked lengths as Python ints, read once)
        if lengths is not None:
            lengths = check_lengths(lengths, batch, steps, x.device)
            if not traced:
                values = lengths.tolist()
        # lengths that all equal T: the padded call itself, with nothing to sort, gather or zero
        ragged = lengths is not None and (traced or tied_dropout
                                          or not every_row_runs(values, steps))
        if (not ragged and not tied_dropout and not self._regularised_now()
                and torch_runs_stack(self.math, x, self.hidden_size, self.backend)):
            return self._format_output(*self._torch_stack(x, states0), packed, lengths, unbatched,
                                       out_dtype)

        sorted_lengths = order = inverse = batch_sizes = None
        if ragged:
            row_order = None
            if tied_dropout:  # torch.nn's order
                row_order = torch_order(lengths, None if packed is None else packed.sorted_indices,
                                        packed is not None)
            if traced:  # the values cannot be read: the kernels take the lengths themselves
                sorted_lengths, order, inverse = sort_by_length(lengths, row_order)
                batch_sizes = sorted_lengths
            else:  # the same order and batch sizes, on the ints (engine.lengths.sort_rows)
                assert values is not None
                rows, back, sorted_values, batch_sizes = sort_rows(
                    values, steps, None if row_order is None else row_order.tolist())
                if self.bidirectional:  # (the in-length reversal's index)
                    sorted_lengths = torch.tensor(sorted_values, dtype=torch.int64)
                if rows is not None:  # (None: already longest first, no copies)
                    order, inverse = (torch.tensor(rows, dtype=torch.int64),
                                      torch.tensor(back, dtype=torch.int64))
            if order is not None:  # index_select, not x[:, order]: its backward (index_add) is
                # several times faster than the accumulating index_put of advanced indexing
                x = x.index_select(1, order.to(x.device))
                states0 = [s.index_select(1, order.to(x.device)) for s in states0]
        # the backward direction's in-length reversal: one index for every layer of the stack
        # (None: every row runs every step, a plain flip in time)
        reversal = (None if sorted_lengths is None or not self.bidirectional
                    else reversal_rows(sorted_lengths, steps))

        layer_input = x.contiguous()
        finals: list[list[Tensor]] = [[] for _ in states0]
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = _dropout_between_layers(layer_input, self.dropout, batch_sizes)
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                state0 = tuple(s[index] for s in states0)
                source = layer_input
                if direction == 1:
                    source = reverse_rows(layer_input, reversal).contiguous()
                params = self.layer_params(layer, direction)
                masks = None
                if self._regularised_now():  # masks in a fixed order: same draws in any engine
                    if self.training and self.input_dropout:
                        source = drop_input(source, self.input_dropout)
                    if self.training and self.weight_drop:
                        params = (params[0], drop_weight(params[1], self.weight_drop), *params[2:])
                    zoneout_c = self.zoneout if self.zoneout_cell is None else self.zoneout_cell
                    masks = recurrent_masks(self.training, source, len(state0), self.hidden_size,
                                            self.recurrent_dropout, self.zoneout, zoneout_c)
                out, final = run_layer(
                    self.math, source, state0, params, batch_sizes, self.backend, masks,
                )
                if direction == 1:
                    out = reverse_rows(out, reversal)
                outputs.append(out)
                for collected, value in zip(finals, final):
                    collected.append(value)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

        output = layer_input
        final_states = [torch.stack(values) for values in finals]  # (L*D, B, H) each
        if inverse is not None:
            output = output.index_select(1, inverse.to(x.device))
            final_states = [s.index_select(1, inverse.to(x.device)) for s in final_states]
        return self._format_output(output, final_states, packed, lengths, unbatched, out_dtype)

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
        """Every layer and direction in one call of torch's own op, the one torch.nn calls:
        the LSTM's when ``torch_runs_stack``; any variant torch.nn has in a legacy ONNX export
        (:meth:`_check_legacy_onnx_export`). No dropout between layers (the callers' terms)."""
        parameters = self._parameters  # (getattr on a Module costs a microsecond per name; a
        # computed weight (pruning, weight norm) is not in the dict: getattr finds it)
        weights = [parameters[name] if name in parameters else getattr(self, name)
                   for names in self._param_names for name in names]
        if self.math.kind == "lstm":
            output, *final_states = torch._VF.lstm(
                x, tuple(states0), weights, self.bias, self.num_layers, 0.0, self.training,
                self.bidirectional, False)
            return output, final_states
        op = {"GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh,
              "RNN_RELU": torch._VF.rnn_relu}[self.mode]
        output, final = op(x, states0[0], weights, self.bias, self.num_layers, 0.0,
                           self.training, self.bidirectional, False)
        return output, [final]

    def _check_legacy_onnx_export(self, packed: PackedSequence | None, lengths: Any) -> None:
        """``torch.onnx.export(..., dynamo=False)`` traces the forward with ``torch.jit.trace``,
        which sees rnnkit's kernels as opaque calls (no ONNX form: "ArrayRef: invalid index")
        and Python loops as a graph unrolled for the example's length (a file wrong at any
        other length). What torch.nn has, it exports as torch.nn does — torch's op, one ONNX
        LSTM / GRU / RNN node; anything else is refused here, naming the exporter that writes
        it (``rnnkit.export_onnx``: ONNX's nodes for every variant, ``lengths`` as
        ``sequence_lens``), before a file is written."""
        problem = self._torch_compatibility_problem()
        if self.regularisers:
            problem = f"torch.nn has no {', '.join(self.regularisers)}"
        elif self.proj_size and problem is None:
            problem = "ONNX's LSTM operator has no projection (proj_size)"
        elif problem is None and (packed is not None or lengths is not None):
            problem = "lengths= or a PackedSequence would be fixed into the traced graph"
        elif problem is None and self.training and self.dropout and self.num_layers > 1:
            problem = "dropout between layers in training mode has no ONNX form (call .eval())"
        if problem is not None:
            raise RuntimeError(
                f"torch.onnx.export(dynamo=False) cannot export this rnnkit.{type(self).__name__}"
                f": {problem}. Use rnnkit.export_onnx(model, args, path), which writes ONNX's "
                "LSTM / GRU / RNN nodes for every rnnkit variant (lengths as sequence_lens)")

    def _initial_states(
        self, hx: Any, batch: int, unbatched: bool, x: Tensor
    ) -> list[Tensor]:
        """The initial states as (L*D, B, H) tensors (h: (L*D, B, proj_size) with a projection),
        zeros where ``hx`` is None."""
        names = self.math.state_names
        depth = self.num_layers * self.num_directions
        sizes = [self.output_size] + [self.hidden_size] * (len(names) - 1)
        if hx is None:
            return [x.new_zeros(depth, batch, size) for size in sizes]
        given = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        if len(given) != len(names):
            kind = type(self).__name__
            expected = "a tuple (h_0, c_0)" if len(names) == 2 else "a single tensor h_0"
            raise ValueError(f"{kind} expects hx to be {expected}, got {len(given)} tensor(s)")
        states = []
        for name, state, size in zip(names, given, sizes):
            shape = (depth, size) if unbatched else (depth, batch, size)
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
        out_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor | PackedSequence, Any]:
        if out_dtype is not None:  # (under CPU autocast: see rnnkit.engine.precision)
            output = output.to(out_dtype)
            final_states = [s.to(out_dtype) for s in final_states]
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
        if self.regularisers:
            problem = f"torch.nn has no {', '.join(self.regularisers)}"
        if problem:
            raise ValueError(f"{type(self).__name__} cannot become a {self.torch_class.__name__}: "
                             f"{problem}")
        weight = self.weight_hh_l0
        module = self.torch_class(**self._torch_kwargs(), device=weight.device, dtype=weight.dtype)
        module.load_state_dict(self.state_dict())
        return module

    @classmethod
    def _check_torch_module(cls, module: nn.Module) -> None:
        if not isinstance(module, cls.torch_class):
            raise TypeError(
                f"{cls.__name__}.from_torch expects a torch.nn.{cls.torch_class.__name__}, "
                f"got {type(module).__name__}"
            )

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
                              ("bidirectional", False), ("proj_size", 0),
                              ("recurrent_dropout", 0.0), ("input_dropout", 0.0), ("zoneout", 0.0),
                              ("zoneout_cell", None), ("weight_drop", 0.0), ("chrono", None)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text + f", cell={self.math!r}"


def _dropout_between_layers(x: Tensor, p: float, batch_sizes: list[int] | Tensor | None
                            ) -> Tensor:
    """``dropout`` on a layer's output (T, B, F), drawn as torch.nn draws it: on a packed
    sequence torch.nn drops the packed data — the real steps only, time-major, longest first,
    which is the order of ``x`` here — so the same seed gives the same masks and the same
    answer; the padding (zero outputs) stays zero. In a traced graph ``batch_sizes`` is the
    longest-first lengths tensor (engine.lengths.Ragged), whose values cannot select rows: the
    mask is drawn over the padded tensor and the padding zeroed."""
    if batch_sizes is None:
        return F.dropout(x, p, training=True)
    steps, batch = x.shape[0], x.shape[1]
    if isinstance(batch_sizes, Tensor):
        running = torch.arange(steps, device=x.device).unsqueeze(1) < batch_sizes.to(x.device)
        return torch.where(running.unsqueeze(2), F.dropout(x, p, training=True), x.new_zeros(()))
    real = torch.arange(batch) < torch.tensor(batch_sizes).unsqueeze(1)  # (T, B)
    real = real.to(x.device)
    dropped = x.new_zeros(steps, batch, x.shape[2])
    dropped[real] = F.dropout(x[real], p, training=True)  # (N, F): the packed data's rows
    return dropped


REGULARISERS = ("recurrent_dropout", "input_dropout", "zoneout", "zoneout_cell", "weight_drop")


def _only_regularisers(layer: str, kwargs: dict[str, Any], gated: bool = True) -> dict[str, Any]:
    """``kwargs`` if each is a regulariser (or ``chrono``, for a ``gated`` layer); else the
    TypeError Python gives for an unknown keyword (e.g. ``GRU(..., proj_size=2)``: as in
    torch.nn, only the LSTM has a projection; ``RNN(..., chrono=600)``: no gate to set)."""
    for name in kwargs:
        if name not in REGULARISERS and not (gated and name == "chrono"):
            raise TypeError(f"{layer}.__init__() got an unexpected keyword argument {name!r}")
    return kwargs


def _factory_of(module: nn.Module) -> dict[str, Any]:
    """The ``device=``/``dtype=`` of a torch.nn module's weights (what ``from_torch`` copies)."""
    return {"device": module.weight_hh_l0.device, "dtype": module.weight_hh_l0.dtype}


# ``orthogonal=`` of RNN → torch's orthogonal_map: W_hh = base · exp(A − Aᵀ) (expRNN,
# Lezcano-Casado & Martínez-Rubio 2019) or base · Cayley(A − Aᵀ) (scoRNN-like, Helfrich et al.
# 2018, without the scaling), A the lower triangle of the trained tensor
ORTHOGONAL_MAPS = {"exp": "matrix_exp", "cayley": "cayley"}


def henaff_orthogonal(size: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None) -> Tensor:
    """Henaff, Szlam & LeCun (2016)'s orthogonal initialisation: block-diagonal 2 × 2 rotations
    by angles θ ~ U[−π, π] (a trailing 1 when ``size`` is odd). Its eigenvalues e^{±iθ} are spread
    evenly over the unit circle, so the state holds components turning at every speed (what
    expRNN and scoRNN start the copy task from)."""
    angles = torch.empty(size // 2, dtype=torch.float64).uniform_(-math.pi, math.pi,
                                                                  generator=generator)
    cos, sin = angles.cos(), angles.sin()
    weight = torch.zeros(size, size, dtype=torch.float64)
    even = torch.arange(0, 2 * (size // 2), 2)
    weight[even, even], weight[even, even + 1] = cos, -sin
    weight[even + 1, even], weight[even + 1, even + 1] = sin, cos
    if size % 2:
        weight[-1, -1] = 1.0
    return weight.to(dtype or torch.get_default_dtype())


class RNN(RecurrentLayer):
    """Elman RNN layers (``torch.nn.RNN``), with ``nonlinearity`` in tanh, relu, sigmoid or
    identity (the linear RNN).

    ``**regularisers``: ``recurrent_dropout``, ``input_dropout``, ``zoneout``, ``weight_drop``
    (see :class:`RecurrentLayer`).

    ``orthogonal`` ("exp" or "cayley", keyword-only): every ``weight_hh_l{k}`` is kept exactly
    orthogonal through training by torch's ``parametrizations.orthogonal`` (its
    ``orthogonal_map`` "matrix_exp" or "cayley"): ``W_hh = B · exp(A − Aᵀ)`` with ``B`` the
    initial W_hh (a buffer) and ``A`` the lower triangle of the trained tensor
    ``parametrizations.weight_hh_l{k}.original`` (expRNN, Lezcano-Casado & Martínez-Rubio 2019).
    ``W_hh`` starts as :func:`henaff_orthogonal`. An orthogonal W_hh neither shrinks nor grows
    the recurrent gradient, so it reaches back hundreds of steps (the copy task at T = 1000).
    W_hh is computed once per forward and runs through the same engines as a plain weight;
    ``weight_drop`` then drops entries of the computed (orthogonal) W_hh. Saving goes through
    ``state_dict`` (A and B; checkpoints do): torch refuses to pickle a parametrized module.
    """

    torch_class = nn.RNN
    orthogonal: str | None = None  # (a class default: layers pickled before it existed)

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1,
        nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, bidirectional: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        *,  # (torch.nn.RNN's positional order; then rnnkit's)
        backend: str | None = None, orthogonal: str | None = None, **regularisers: Any,
    ) -> None:
        if device in ("fused", "bptt", "reference"):  # (before session 11 the 9th was backend)
            raise TypeError(f"RNN(): backend is keyword-only (backend={device!r}); the 9th "
                            "positional argument is torch.nn.RNN's device")
        if orthogonal is not None and orthogonal not in ORTHOGONAL_MAPS:
            raise ValueError(f"orthogonal must be one of {', '.join(ORTHOGONAL_MAPS)} or None, "
                             f"got {orthogonal!r}")
        self.nonlinearity = nonlinearity
        super().__init__(ElmanMath(nonlinearity), input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, backend, device=device, dtype=dtype,
                         **_only_regularisers("RNN", regularisers, gated=False))
        self.orthogonal = orthogonal
        if orthogonal is not None:
            for names in self._param_names:
                name = names[1]  # weight_hh_l{k}[_reverse]
                with torch.no_grad():
                    getattr(self, name).copy_(henaff_orthogonal(hidden_size, dtype=dtype))
                # registering reads the (orthogonal) weight into its base B; A starts at 0
                parametrize_orthogonal(self, name, orthogonal_map=ORTHOGONAL_MAPS[orthogonal])

    def reset_parameters(self) -> None:
        """Uniform, as torch.nn; an ``orthogonal`` W_hh is set to a fresh Henaff rotation
        (through the parametrization: B = that rotation, A = 0)."""
        if self.orthogonal is None:
            super().reset_parameters()
            return
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for names in self._param_names:
                for name in names:
                    if name.startswith("weight_hh"):
                        original = self.parametrizations[name].original
                        setattr(self, name, henaff_orthogonal(self.hidden_size, dtype=original.dtype
                                                              ).to(original.device))
                    else:
                        nn.init.uniform_(getattr(self, name), -bound, bound)

    def _torch_kwargs(self) -> dict[str, Any]:
        return {**super()._torch_kwargs(), "nonlinearity": self.nonlinearity}

    def _torch_compatibility_problem(self) -> str | None:
        if self.nonlinearity in ("sigmoid", "identity"):
            return f"torch.nn.RNN has no {self.nonlinearity} nonlinearity"
        if self.orthogonal is not None:
            return "its W_hh is parametrized (orthogonal=); torch.nn.RNN's is a plain weight"
        return None

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.orthogonal is None else text + f", orthogonal={self.orthogonal!r}"

    @classmethod
    def from_torch(cls, module: nn.RNN, backend: str | None = None) -> RNN:
        """An exact copy of a ``torch.nn.RNN``."""
        cls._check_torch_module(module)
        layer = cls(module.input_size, module.hidden_size, module.num_layers,
                    module.nonlinearity, module.bias, module.batch_first, module.dropout,
                    module.bidirectional, backend=backend, **_factory_of(module))
        return layer._load_torch_weights(module)


class LSTM(RecurrentLayer):
    """LSTM layers (``torch.nn.LSTM``), with ``peephole`` and ``coupled`` (CIFG) variants.

    ``forget_bias`` sets the initial total forget-gate bias (TensorFlow uses 1.0). ``proj_size``
    > 0 adds torch.nn.LSTM's projection (LSTMP, Sak et al. 2014; ``weight_hr_l{k}`` (P, H)):
    h, the output and the recurrent input are P wide, c stays H wide; it combines with
    ``peephole`` and ``coupled``. ``layer_norm=True`` is the layer-normalised LSTM
    (:mod:`rnnkit.cells.layer_norm`).
    ``**regularisers``: ``recurrent_dropout``, ``input_dropout``, ``zoneout``, ``zoneout_cell``,
    ``weight_drop``; and ``chrono`` T_max, the chrono initialisation ``b_f = log u``,
    ``b_i = −b_f``, ``u ~ U[1, T_max − 1]`` (see :class:`RecurrentLayer`).
    """

    torch_class = nn.LSTM

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        proj_size: int = 0, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, *,  # (torch.nn.LSTM's positional order; then rnnkit's)
        peephole: bool = False, coupled: bool = False, forget_bias: float | None = None,
        backend: str | None = None, layer_norm: bool = False, **regularisers: Any,
    ) -> None:
        self.peephole = peephole
        self.coupled = coupled
        self.forget_bias = forget_bias
        self.layer_norm = layer_norm
        check_proj_size(proj_size, hidden_size)
        if forget_bias is not None and regularisers.get("chrono") is not None:
            raise ValueError("forget_bias and chrono both set the forget-gate bias; give one")
        if layer_norm and proj_size:
            raise ValueError("layer_norm=True with proj_size > 0 is not implemented")
        super().__init__(lstm_math(peephole, coupled, layer_norm, bias, proj_size > 0),
                         input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, backend, proj_size=proj_size, device=device, dtype=dtype,
                         **_only_regularisers("LSTM", regularisers))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.forget_bias is None:
            return
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                if not self.bias:
                    raise ValueError("forget_bias needs bias=True")
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                init_forget_bias(*gate_bias_vectors(self, suffix), self.hidden_size,
                                 self.coupled, self.forget_bias)

    def _torch_kwargs(self) -> dict[str, Any]:
        return {**super()._torch_kwargs(), "proj_size": self.proj_size}

    def _torch_compatibility_problem(self) -> str | None:
        if self.peephole or self.coupled:
            return "torch.nn.LSTM has neither peephole connections nor coupled gates"
        if self.layer_norm:
            return "torch.nn.LSTM has no layer normalisation"
        return None

    @classmethod
    def from_torch(cls, module: nn.LSTM, backend: str | None = None) -> LSTM:
        """An exact copy of a ``torch.nn.LSTM`` (its ``proj_size`` too)."""
        cls._check_torch_module(module)
        layer = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                    module.batch_first, module.dropout, module.bidirectional, backend=backend,
                    proj_size=module.proj_size, **_factory_of(module))
        return layer._load_torch_weights(module)


class GRU(RecurrentLayer):
    """GRU layers (``torch.nn.GRU``); ``reset="before"`` is the original form of Cho et al. 2014;
    ``layer_norm=True`` is the layer-normalised GRU (:mod:`rnnkit.cells.layer_norm`).

    ``**regularisers``: ``recurrent_dropout``, ``input_dropout``, ``zoneout``, ``weight_drop``; and
    ``chrono`` T_max, the chrono initialisation of the update gate, ``b_z = log u``,
    ``u ~ U[1, T_max − 1]`` (z keeps h_{t−1}; see :class:`RecurrentLayer`).
    """

    torch_class = nn.GRU

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        *,  # (torch.nn.GRU's positional order; then rnnkit's)
        reset: str = "after", backend: str | None = None, layer_norm: bool = False,
        **regularisers: Any,
    ) -> None:
        if device in ("after", "before"):  # (before session 11 the 8th argument was reset)
            raise TypeError(f"GRU(): reset is keyword-only (reset={device!r}); the 8th "
                            "positional argument is torch.nn.GRU's device")
        self.reset = reset
        self.layer_norm = layer_norm
        super().__init__(gru_math(reset, layer_norm, bias), input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, backend, device=device,
                         dtype=dtype, **_only_regularisers("GRU", regularisers))

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
                    module.batch_first, module.dropout, module.bidirectional, backend=backend,
                    **_factory_of(module))
        return layer._load_torch_weights(module)


class MinimalLayer(RecurrentLayer):
    """Stacked minGRU / minLSTM layers (:mod:`rnnkit.cells.minimal`) run by a parallel scan.

    The same call as the other layers — ``output, h_n = layer(input, hx, lengths=...)``, input
    (T, B, I) or batch-first or unbatched or packed, ``h_n`` (L·D, B, H) — but each layer and
    direction is one scan over all time steps (:func:`~rnnkit.engine.scan.minimal_layer`)
    instead of a loop, because no gate reads ``h_{t−1}``. Parameters: ``weight_ih_l{k}`` and
    ``bias_ih_l{k}`` (``_reverse`` for the backward direction); there is no recurrent weight.
    """

    def __init__(
        self, math_: MinimalMath, input_size: int, hidden_size: int, num_layers: int = 1,
        bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
        bidirectional: bool = False, backend: str = "auto",
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        chrono: float | None = None,
    ) -> None:
        nn.Module.__init__(self)
        check_layer_arguments(input_size, hidden_size, num_layers, dropout)
        self.chrono = chrono
        factory_kwargs = {"device": device, "dtype": dtype}  # as torch.nn's factory arguments
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
                setattr(self, names[0],
                        nn.Parameter(torch.empty(rows, layer_input, **factory_kwargs)))
                if bias:
                    names.append("bias_ih" + suffix)
                    setattr(self, names[1], nn.Parameter(torch.empty(rows, **factory_kwargs)))
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
        if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
            # the legacy exporter sees the scan as an opaque operator: refused before any file
            raise RuntimeError(
                f"torch.onnx.export(dynamo=False) cannot export rnnkit.{type(self).__name__}: "
                "its scan operator has no ONNX form in torch's exporters. Use "
                "rnnkit.export_onnx(model, args, path), which writes it as ONNX GRU nodes")
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
                out, final = minimal_layer(self.math, source, weight, bias, h0[index], lengths,
                                           self.backend)
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
    """minGRU layers (Feng et al. 2024), trained by a parallel scan over time; ``chrono`` T_max:
    the update gate's bias starts at ``−log u``, ``u ~ U[1, T_max − 1]`` (1 − z keeps h)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 backend: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, chrono: float | None = None) -> None:
        super().__init__(MinGRUMath(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, backend, device, dtype, chrono)


class MinLSTM(MinimalLayer):
    """minLSTM layers (Feng et al. 2024), trained by a parallel scan over time; ``chrono`` T_max:
    ``b_f = log u``, ``b_i = −b_f``, ``u ~ U[1, T_max − 1]``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 backend: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, chrono: float | None = None) -> None:
        super().__init__(MinLSTMMath(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, backend, device, dtype, chrono)
