"""``export_onnx(module, args, path)``: any ``nn.Module`` holding rnnkit layers, as an ONNX file
whose recurrent layers are ONNX's own ``LSTM`` / ``GRU`` / ``RNN`` nodes.

How: for the duration of the export every rnnkit layer's ``forward`` is swapped for one that
calls, per stacked layer, one operator of the ``rnnkit_onnx`` library below — ``rnnkit_onnx::lstm``,
``::gru`` or ``::rnn``, whose arguments and results are exactly the ONNX operator's (weights in
ONNX's layout and gate order, ``sequence_lens``, ``direction``) — and ``torch.onnx.export``
(torch.export based) is given a translation table that writes each as that one ONNX node.
Everything around the layers (embeddings, projections, pooling, masks) is exported by torch as
usual. Batch and time stay dynamic.

Variant → ONNX (the table ``ONNX_FORMS``):

* LSTM: gate blocks i, f, g, o → ONNX's i, o, f, c; peepholes ``weight_ci/cf/co`` → ``P`` in
  order i, o, f; coupled gates (CIFG, f = 1 − i) → ``input_forget=1`` (the unused f block zero);
* GRU: r, z, n → z, r, h; ``reset="after"`` (torch's form) → ``linear_before_reset=1``,
  ``reset="before"`` (Cho et al.) → ``linear_before_reset=0``;
* Elman RNN: ``nonlinearity`` tanh / relu / sigmoid / identity → ``activations`` Tanh / Relu /
  Sigmoid / Affine(1, 0);
* minGRU / minLSTM (no ONNX operator of their own): a ``GRU`` node with ``linear_before_reset=0``,
  activations Sigmoid / Affine(1, 0), whose input is ``[u; g(v)]`` computed from the input
  projection and whose weights only select it (:func:`minimal_node_input`);
* ``lengths=`` → ``sequence_lens``; bidirectional → ``direction="bidirectional"``; a stack of
  L layers → a chain of L nodes.

Everything that cannot become such a graph is refused before a file is written, with one line
naming it: a dtype other than float32, a tensor off the CPU, dropout in training mode, and the
pieces that have no ONNX form (CRF Viterbi decoding, beam and greedy search, sampling loops).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit.cells import CellSpec, math_for
from rnnkit.cells.minimal import positive_activation
from rnnkit.layers import MinimalLayer, RecurrentLayer
from rnnkit.train.atomic import FILE_MODE
from rnnkit.validation import check_length_values, check_lengths_metadata


class ExportError(ValueError):
    """The module cannot be exported as asked; the message names what and why."""


# ---- the ONNX form of each variant ---------------------------------------------------------------

ZERO = -1  # a gate block ONNX expects that the variant does not have (filled with zeros)

# spec -> (ONNX operator, rnnkit gate block at each ONNX block position, ONNX attributes)
ONNX_FORMS: dict[CellSpec, tuple[str, tuple[int, ...], dict[str, Any]]] = {
    CellSpec("lstm"): ("LSTM", (0, 3, 1, 2), {"input_forget": 0}),
    CellSpec("lstm", peephole=True): ("LSTM", (0, 3, 1, 2), {"input_forget": 0}),
    CellSpec("lstm", coupled=True): ("LSTM", (0, 2, ZERO, 1), {"input_forget": 1}),
    CellSpec("lstm", peephole=True, coupled=True): ("LSTM", (0, 2, ZERO, 1), {"input_forget": 1}),
    CellSpec("gru", reset="after"): ("GRU", (1, 0, 2), {"linear_before_reset": 1}),
    CellSpec("gru", reset="before"): ("GRU", (1, 0, 2), {"linear_before_reset": 0}),
    CellSpec("rnn", nonlinearity="tanh"): ("RNN", (0,), {"activation": "Tanh"}),
    CellSpec("rnn", nonlinearity="relu"): ("RNN", (0,), {"activation": "Relu"}),
    CellSpec("rnn", nonlinearity="sigmoid"): ("RNN", (0,), {"activation": "Sigmoid"}),
    # the linear RNN: ONNX's Affine(alpha = 1, beta = 0), the identity
    CellSpec("rnn", nonlinearity="identity"): ("RNN", (0,), {"activation": "Affine"}),
}

# rnnkit's peephole vectors (``diagonal_names``) at ONNX's P positions i, o, f
PEEPHOLE_ORDER = ("weight_ci", "weight_co", "weight_cf")


def onnx_form(spec: CellSpec) -> tuple[str, tuple[int, ...], dict[str, Any]]:
    if spec.projection:  # (the LSTM operator's outputs are its H-wide h; nothing projects them)
        raise ExportError("an LSTM with proj_size > 0 cannot be exported: ONNX's LSTM operator "
                          "has no projection (weight_hr)")
    try:
        return ONNX_FORMS[spec]
    except KeyError:
        raise ExportError(f"no ONNX form for the cell variant {spec}") from None


def _blocks(weight: Tensor, order: Sequence[int], hidden: int) -> Tensor:
    """The rows of ``weight`` (G*H, ...) rearranged into ONNX's gate order (zeros for ZERO)."""
    parts = [weight.new_zeros((hidden, *weight.shape[1:])) if k == ZERO
             else weight[k * hidden:(k + 1) * hidden] for k in order]
    return torch.cat(parts)


def _unblocks(weight: Tensor, order: Sequence[int], hidden: int) -> Tensor:
    """The inverse of :func:`_blocks`: ONNX rows back into rnnkit's order (ZERO blocks dropped)."""
    position = {k: i for i, k in enumerate(order) if k != ZERO}
    return torch.cat([weight[position[k] * hidden:(position[k] + 1) * hidden]
                      for k in range(len(position))])


def onnx_weights(layer: RecurrentLayer, index: int) -> dict[str, Tensor]:
    """Stacked layer ``index``'s weights in ONNX's layout: W (D, G'H, I), R (D, G'H, H),
    B (D, 2G'H) and, with peepholes, P (D, 3H)."""
    spec, hidden = layer.math.spec, layer.hidden_size
    _, order, _ = onnx_form(spec)
    per_direction: dict[str, list[Tensor]] = {"W": [], "R": [], "B": [], "P": []}
    for direction in range(layer.num_directions):
        w_ih, w_hh, b_ih, b_hh, *diagonal = layer.layer_params(index, direction)
        per_direction["W"].append(_blocks(w_ih, order, hidden))
        per_direction["R"].append(_blocks(w_hh, order, hidden))
        if b_ih is None:  # ONNX's B is optional only as a whole: zeros are the same as absent
            b_ih, b_hh = w_ih.new_zeros(w_ih.shape[0]), w_hh.new_zeros(w_hh.shape[0])
        per_direction["B"].append(torch.cat((_blocks(b_ih, order, hidden),
                                             _blocks(b_hh, order, hidden))))
        if diagonal:
            named = dict(zip(layer.math.diagonal_names, diagonal))
            per_direction["P"].append(torch.cat([
                named[name] if name in named else w_hh.new_zeros(hidden)
                for name in PEEPHOLE_ORDER]))
    return {name: torch.stack(values).detach().clone()
            for name, values in per_direction.items() if values}


# ---- the operators: ONNX's RNN/GRU/LSTM semantics as torch ops -----------------------------------
#
# Their eager kernels run rnnkit's own layer on the weights converted back (so tracing, fake
# tensors and any eager call agree with what the ONNX node computes); the exporter never runs
# them, it only needs their fake kernels and the translation table.


def _run_onnx_semantics(spec: CellSpec, x: Tensor, W: Tensor, R: Tensor, B: Tensor,
                        P: Tensor | None, h0: Tensor, c0: Tensor | None,
                        sequence_lens: Tensor | None) -> tuple[Tensor, ...]:
    _, order, _ = onnx_form(spec)
    directions, _, inputs = W.shape
    hidden = R.shape[2]
    layer = RecurrentLayer(math_for(spec), inputs, hidden, bidirectional=directions == 2,
                           bias=True).to(x.dtype)
    math = layer.math
    with torch.no_grad():
        for direction in range(directions):
            params = layer.layer_params(0, direction)
            half = B.shape[1] // 2
            values = [_unblocks(W[direction], order, hidden), _unblocks(R[direction], order, hidden),
                      _unblocks(B[direction, :half], order, hidden),
                      _unblocks(B[direction, half:], order, hidden)]
            if P is not None:
                peep = dict(zip(PEEPHOLE_ORDER, P[direction].split(hidden)))
                values += [peep[name] for name in math.diagonal_names]
            for param, value in zip(params, values):
                param.copy_(value)
        hx = h0 if c0 is None else (h0, c0)
        lengths = None if sequence_lens is None else sequence_lens.long()
        output, state = layer(x, hx, lengths=lengths)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    steps, batch = x.shape[:2]
    y = output.view(steps, batch, directions, hidden).permute(0, 2, 1, 3).contiguous()
    return (y, h_n.clone()) if c_n is None else (y, h_n.clone(), c_n.clone())


def _require(condition: Any, message: str) -> None:
    """One argument check of the rnnkit_onnx operators. Their fake kernels run it too, so that an
    export stops before a file is written; there a condition on a dynamic size is symbolic and
    torch._check records it (raised at once where it is decided false)."""
    if isinstance(condition, bool):
        if not condition:
            raise ValueError(message)
    else:
        torch._check(condition, lambda: message)


def _described(value: Any) -> str:
    if not isinstance(value, Tensor):
        return "None" if value is None else type(value).__name__
    return f"{tuple(value.shape)} of {str(value.dtype).removeprefix('torch.')}"


def check_onnx_arguments(op: str, x: Tensor, W: Tensor, R: Tensor, B: Tensor,
                         sequence_lens: Tensor | None, initial_h: Tensor, gates: int,
                         initial_c: Tensor | None = None, P: Tensor | None = None,
                         with_cell: bool = False) -> None:
    """The arguments of ``rnnkit_onnx::<op>`` in ONNX's layout 0, each as the ONNX operator
    defines it: one line naming the first that is not. (Unchecked, a W of another width was
    read by the eager kernel as other weights, and a file was written whose node the runtime
    refuses or reads otherwise.)"""
    for name, value in (("x", x), ("W", W), ("R", R), ("B", B), ("initial_h", initial_h)):
        _require(isinstance(value, Tensor), f"rnnkit_onnx::{op}: {name} is None; a tensor is "
                 "required")
    _require(x.dim() == 3 and x.dtype in (torch.float32, torch.float64),
             f"rnnkit_onnx::{op}: x must be (T, B, I) of float32 or float64, got {_described(x)}")
    _, batch, inputs = x.shape
    _require(R.dim() == 3 and R.shape[0] in (1, 2) and R.shape[1] == gates * R.shape[2],
             f"rnnkit_onnx::{op}: R must be (D, {gates}*H, H) with D = 1 or 2, got {_described(R)}")
    directions, hidden = R.shape[0], R.shape[2]
    expected = {"W": (W, (directions, gates * hidden, inputs)), "R": (R, tuple(R.shape)),
                "B": (B, (directions, 2 * gates * hidden)),
                "initial_h": (initial_h, (directions, batch, hidden))}
    if with_cell:
        expected["initial_c"] = (initial_c, (directions, batch, hidden))
    if P is not None:
        expected["P"] = (P, (directions, 3 * hidden))
    for name, (value, shape) in expected.items():
        _require(isinstance(value, Tensor), f"rnnkit_onnx::{op}: {name} is None; a tensor is "
                 "required")
        _require(value.dim() == len(shape) and value.dtype == x.dtype,
                 f"rnnkit_onnx::{op}: {name} must be {shape} of x's dtype, got "
                 f"{_described(value)}")
        for size, want in zip(value.shape, shape):
            _require(size == want, f"rnnkit_onnx::{op}: {name} must be {shape} of x's dtype, "
                     f"got {_described(value)}")
    if sequence_lens is not None:
        _require(sequence_lens.dtype in (torch.int32, torch.int64) and sequence_lens.dim() == 1,
                 f"rnnkit_onnx::{op}: sequence_lens must be a (B,) int32 or int64 tensor, got "
                 f"{_described(sequence_lens)}")
        _require(sequence_lens.shape[0] == batch, f"rnnkit_onnx::{op}: sequence_lens must be "
                 f"(B,) = ({batch},), got {_described(sequence_lens)}")


def _attribute(op: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
    _require(value in allowed, f"rnnkit_onnx::{op}: {name} must be one of {list(allowed)}, got "
             f"{value!r}")


RNN_ACTIVATIONS = ("Tanh", "Relu", "Sigmoid", "Affine")


def _spec(kind: str, nonlinearity: str = "tanh", peephole: bool = False, coupled: bool = False,
          reset: str = "after") -> CellSpec:
    return CellSpec(kind, nonlinearity, peephole, coupled, reset)


@torch.library.custom_op("rnnkit_onnx::lstm", mutates_args=())
def onnx_lstm(x: Tensor, W: Tensor, R: Tensor, B: Tensor, sequence_lens: Tensor | None,
              initial_h: Tensor, initial_c: Tensor, P: Tensor | None, input_forget: int
              ) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX LSTM (layout 0): Y (T, D, B, H), Y_h, Y_c (D, B, H)."""
    _check_lstm(x, W, R, B, sequence_lens, initial_h, initial_c, P, input_forget)
    spec = _spec("lstm", peephole=P is not None, coupled=bool(input_forget))
    return _run_onnx_semantics(spec, x, W, R, B, P, initial_h, initial_c, sequence_lens)


@torch.library.custom_op("rnnkit_onnx::gru", mutates_args=())
def onnx_gru(x: Tensor, W: Tensor, R: Tensor, B: Tensor, sequence_lens: Tensor | None,
             initial_h: Tensor, linear_before_reset: int) -> tuple[Tensor, Tensor]:
    """ONNX GRU (layout 0): Y (T, D, B, H), Y_h (D, B, H)."""
    _check_gru(x, W, R, B, sequence_lens, initial_h, linear_before_reset)
    spec = _spec("gru", reset="after" if linear_before_reset else "before")
    return _run_onnx_semantics(spec, x, W, R, B, None, initial_h, None, sequence_lens)


@torch.library.custom_op("rnnkit_onnx::rnn", mutates_args=())
def onnx_rnn(x: Tensor, W: Tensor, R: Tensor, B: Tensor, sequence_lens: Tensor | None,
             initial_h: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """ONNX RNN (layout 0) with one activation for every direction."""
    _check_rnn(x, W, R, B, sequence_lens, initial_h, activation)
    spec = _spec("rnn", nonlinearity="identity" if activation == "Affine" else activation.lower())
    return _run_onnx_semantics(spec, x, W, R, B, None, initial_h, None, sequence_lens)


@torch.library.custom_op("rnnkit_onnx::gru_affine", mutates_args=())
def onnx_gru_affine(x: Tensor, W: Tensor, R: Tensor, B: Tensor, sequence_lens: Tensor | None,
                    initial_h: Tensor) -> tuple[Tensor, Tensor]:
    """ONNX GRU (layout 0, ``linear_before_reset=0``) with the activations Sigmoid for the gates
    and Affine(1, 0) for the candidate — the form a minGRU / minLSTM layer is written in
    (:func:`_export_minimal_forward`). Its own loop of ONNX's equations, per direction."""
    from rnnkit.engine.lengths import reverse_within_lengths

    check_onnx_arguments("gru_affine", x, W, R, B, sequence_lens, initial_h, 3)
    hidden = R.shape[2]
    lengths = None if sequence_lens is None else sequence_lens.long()
    if lengths is not None:  # (its own loop: a length of 0, below 0 or past T ran without a word)
        check_length_values(lengths, x.shape[0])
    ys, finals = [], []
    for direction in range(W.shape[0]):
        w_z, w_r, w_h = W[direction].split(hidden)
        r_z, r_r, r_h = R[direction].split(hidden)
        wb_z, wb_r, wb_h, rb_z, rb_r, rb_h = B[direction].split(hidden)
        source = x if direction == 0 else reverse_within_lengths(x, lengths)
        h, outputs = initial_h[direction], []
        for t in range(x.shape[0]):
            z = torch.sigmoid(source[t] @ w_z.T + h @ r_z.T + wb_z + rb_z)
            r = torch.sigmoid(source[t] @ w_r.T + h @ r_r.T + wb_r + rb_r)
            candidate = source[t] @ w_h.T + (r * h) @ r_h.T + wb_h + rb_h
            new = (1 - z) * candidate + z * h
            if lengths is not None:  # rows past their length keep h and output zeros
                running = (t < lengths).unsqueeze(1)
                new = torch.where(running, new, h)
                outputs.append(torch.where(running, new, torch.zeros_like(new)))
            else:
                outputs.append(new)
            h = new
        y = torch.stack(outputs)
        ys.append(y if direction == 0 else reverse_within_lengths(y, lengths))
        finals.append(h)
    return torch.stack(ys, dim=1), torch.stack(finals)


def _fake_outputs(x: Tensor, R: Tensor, states: int) -> tuple[Tensor, ...]:
    directions, hidden = R.shape[0], R.shape[2]
    y = x.new_empty((x.shape[0], directions, x.shape[1], hidden))
    return (y, *(x.new_empty((directions, x.shape[1], hidden)) for _ in range(states)))


def _check_lstm(x, W, R, B, sequence_lens, initial_h, initial_c, P, input_forget):
    check_onnx_arguments("lstm", x, W, R, B, sequence_lens, initial_h, 4, initial_c, P,
                         with_cell=True)
    _attribute("lstm", "input_forget", input_forget, (0, 1))


def _check_gru(x, W, R, B, sequence_lens, initial_h, linear_before_reset):
    check_onnx_arguments("gru", x, W, R, B, sequence_lens, initial_h, 3)
    _attribute("gru", "linear_before_reset", linear_before_reset, (0, 1))


def _check_rnn(x, W, R, B, sequence_lens, initial_h, activation):
    check_onnx_arguments("rnn", x, W, R, B, sequence_lens, initial_h, 1)
    _attribute("rnn", "activation", activation, RNN_ACTIVATIONS)


# (the fake kernels check as the eager ones: an export with bad arguments stops before a file)
@onnx_lstm.register_fake
def _(x, W, R, B, sequence_lens, initial_h, initial_c, P, input_forget):
    _check_lstm(x, W, R, B, sequence_lens, initial_h, initial_c, P, input_forget)
    return _fake_outputs(x, R, 2)


@onnx_gru.register_fake
def _(x, W, R, B, sequence_lens, initial_h, linear_before_reset):
    _check_gru(x, W, R, B, sequence_lens, initial_h, linear_before_reset)
    return _fake_outputs(x, R, 1)


@onnx_rnn.register_fake
def _(x, W, R, B, sequence_lens, initial_h, activation):
    _check_rnn(x, W, R, B, sequence_lens, initial_h, activation)
    return _fake_outputs(x, R, 1)


@onnx_gru_affine.register_fake
def _(x, W, R, B, sequence_lens, initial_h):
    check_onnx_arguments("gru_affine", x, W, R, B, sequence_lens, initial_h, 3)
    return _fake_outputs(x, R, 1)


def _translation_table() -> dict[Callable, Callable]:
    """Each operator as its one ONNX node (onnxscript, traced by the exporter)."""
    from onnxscript.onnx_opset import opset18 as op

    def direction(W: Any) -> str:
        return "bidirectional" if W.shape[0] == 2 else "forward"

    def lstm(x, W, R, B, sequence_lens, initial_h, initial_c, P, input_forget: int):
        return op.LSTM(x, W, R, B, sequence_lens, initial_h, initial_c, P,
                       hidden_size=R.shape[2], direction=direction(W), input_forget=input_forget)

    def gru(x, W, R, B, sequence_lens, initial_h, linear_before_reset: int):
        return op.GRU(x, W, R, B, sequence_lens, initial_h, hidden_size=R.shape[2],
                      direction=direction(W), linear_before_reset=linear_before_reset)

    def rnn(x, W, R, B, sequence_lens, initial_h, activation: str):
        directions = W.shape[0]
        affine = {"activation_alpha": [1.0] * directions, "activation_beta": [0.0] * directions}
        return op.RNN(x, W, R, B, sequence_lens, initial_h, hidden_size=R.shape[2],
                      direction=direction(W), activations=[activation] * directions,
                      **(affine if activation == "Affine" else {}))

    def gru_affine(x, W, R, B, sequence_lens, initial_h):
        directions = W.shape[0]
        return op.GRU(x, W, R, B, sequence_lens, initial_h, hidden_size=R.shape[2],
                      direction=direction(W), linear_before_reset=0,
                      activations=["Sigmoid", "Affine"] * directions,
                      activation_alpha=[1.0] * directions, activation_beta=[0.0] * directions)

    return {torch.ops.rnnkit_onnx.lstm.default: lstm, torch.ops.rnnkit_onnx.gru.default: gru,
            torch.ops.rnnkit_onnx.rnn.default: rnn,
            torch.ops.rnnkit_onnx.gru_affine.default: gru_affine}


# ---- the layers' forward during export -----------------------------------------------------------


def _export_inputs(self: RecurrentLayer, input: Tensor, hx: Any,
                   lengths: Sequence[int] | Tensor | None
                   ) -> tuple[Tensor, bool, list[Tensor], Tensor | None]:
    """A layer's arguments during export: the (T, B, I) input, whether it was unbatched, the
    initial states (L*D, B, H) and ``sequence_lens`` (int32, or None)."""
    if isinstance(input, PackedSequence):
        raise ExportError(f"{type(self).__name__}: a PackedSequence input cannot be exported; "
                          "pass the padded tensor and lengths= instead")
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else input
    if self.batch_first and not unbatched:
        x = x.transpose(0, 1)
    batch = x.shape[1]
    states0 = self._initial_states(hx, batch, unbatched, x)
    sequence_lens = None
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            # a list is traced as a constant: the file would use the example's lengths for every
            # input of that batch size (and refuse any other batch size) — a silently wrong model
            raise ExportError(f"{type(self).__name__}: lengths= given as a "
                              f"{type(lengths).__name__} would be fixed into the file; pass it "
                              "as a tensor (torch.tensor(lengths)) so that it is an input")
        # (float lengths became truncated int32 and NaN garbage, lengths of another count a
        # sequence_lens the runtime refuses or reads past: as check_lengths says it in eager)
        lengths = check_lengths_metadata(lengths, batch)
        sequence_lens = lengths.to(device=x.device, dtype=torch.int32)
    return x, unbatched, states0, sequence_lens


def _export_forward(self: RecurrentLayer, input: Tensor, hx: Any = None,
                    lengths: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Any]:
    """``RecurrentLayer.forward`` as ONNX nodes: one operator per stacked layer."""
    x, unbatched, states0, sequence_lens = _export_inputs(self, input, hx, lengths)
    kind, _, attributes = onnx_form(self.math.spec)
    depth = self.num_directions
    layer_input = x
    finals: list[list[Tensor]] = [[] for _ in states0]
    for index in range(self.num_layers):
        weights = {name: self.get_buffer(f"_onnx_{name}_l{index}") for name in ("W", "R", "B", "P")
                   if hasattr(self, f"_onnx_{name}_l{index}")}
        initial = [s[index * depth:(index + 1) * depth] for s in states0]
        args = (layer_input, weights["W"], weights["R"], weights["B"], sequence_lens, initial[0])
        if kind == "LSTM":
            y, *state = torch.ops.rnnkit_onnx.lstm(*args, initial[1], weights.get("P"),
                                                   attributes["input_forget"])
        elif kind == "GRU":
            y, *state = torch.ops.rnnkit_onnx.gru(*args, attributes["linear_before_reset"])
        else:
            y, *state = torch.ops.rnnkit_onnx.rnn(*args, attributes["activation"])
        layer_input = y.permute(0, 2, 1, 3).flatten(2)  # (T, D, B, H) -> (T, B, D*H)
        for collected, value in zip(finals, state):
            collected.append(value)
    final_states = [torch.cat(values) for values in finals]  # (L*D, B, H)
    return self._format_output(layer_input, final_states, None, None, unbatched)


def minimal_node_input(layer: MinimalLayer, x: Tensor, index: int, direction: int) -> Tensor:
    """A minGRU / minLSTM direction as the (T, B, 2H) input ``[u; h̃]`` of an ONNX GRU node whose
    selection weights (:func:`minimal_selection`) make it ``h_t = σ(u) h_{t−1} + (1 − σ(u)) h̃``:
    ``σ(u)`` is the coefficient of ``h_{t−1}`` (minGRU: 1 − z = σ(−k); minLSTM:
    f' = f / (f + i) = σ(log f − log i)) and ``h̃ = g(v)`` (:mod:`rnnkit.cells.minimal`)."""
    names = layer._param_names[index * layer.num_directions + direction]
    gx = F.linear(x, layer.get_parameter(names[0]),
                  layer.get_parameter(names[1]) if layer.bias else None)
    if layer.math.kind == "mingru":
        k, v = gx.chunk(2, dim=-1)
        u = -k
    else:
        k_f, k_i, v = gx.chunk(3, dim=-1)
        u = F.softplus(-k_i) - F.softplus(-k_f)
    return torch.cat((u, positive_activation(v)), dim=-1)


def minimal_selection(hidden: int, directions: int) -> dict[str, Tensor]:
    """W, R, B of the ONNX GRU node of :func:`minimal_node_input`: direction d's update gate
    reads its ``u`` and its candidate (Affine, identity) its ``h̃`` from the node input
    ``[u_0; h̃_0; u_1; h̃_1]``; no recurrent weight, no bias (the reset gate is unused).

    The price of ONNX having no element-wise recurrence: W is (D, 3H, 2HD) and R (D, 3H, H) of
    mostly zeros, so the file grows with H² D² (MinGRU(64, 512, bidirectional): 0.53 MB of
    parameters, a 32 MB file) and onnxruntime runs the recurrent product on zeros every step
    (there, T = 200, B = 8: 956 ms against rnnkit's 50 ms, 1 thread, loaded; README says so)."""
    eye = torch.eye(hidden)
    W = torch.zeros(directions, 3 * hidden, 2 * hidden * directions)
    for d in range(directions):
        W[d, :hidden, 2 * hidden * d:2 * hidden * d + hidden] = eye  # z <- u
        W[d, 2 * hidden:, 2 * hidden * d + hidden:2 * hidden * (d + 1)] = eye  # h~ <- g(v)
    return {"W": W, "R": torch.zeros(directions, 3 * hidden, hidden),
            "B": torch.zeros(directions, 6 * hidden)}


def _export_minimal_forward(self: MinimalLayer, input: Tensor, hx: Tensor | None = None,
                            lengths: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Any]:
    """``MinimalLayer.forward`` as ONNX nodes: one GRU node (:func:`minimal_node_input`) per
    stacked layer."""
    x, unbatched, states0, sequence_lens = _export_inputs(self, input, hx, lengths)
    depth = self.num_directions
    W, R, B = (self.get_buffer(f"_onnx_{name}") for name in ("W", "R", "B"))
    layer_input, finals = x, []
    for index in range(self.num_layers):
        node_input = torch.cat([minimal_node_input(self, layer_input, index, d)
                                for d in range(depth)], dim=-1)
        y, h = torch.ops.rnnkit_onnx.gru_affine(node_input, W, R, B, sequence_lens,
                                                 states0[0][index * depth:(index + 1) * depth])
        layer_input = y.permute(0, 2, 1, 3).flatten(2)  # (T, D, B, H) -> (T, B, D*H)
        finals.append(h)
    return self._format_output(layer_input, [torch.cat(finals)], None, None, unbatched)


def _torch_twin(module: nn.Module) -> RecurrentLayer | None:
    """The rnnkit copy of a ``torch.nn.RNN/LSTM/GRU`` (None for anything else, and for an LSTM
    with ``proj_size``, which has no ONNX node)."""
    from rnnkit.layers import GRU, LSTM, RNN

    twin_class = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU}.get(type(module))
    if twin_class is None or getattr(module, "proj_size", 0):
        return None
    return twin_class.from_torch(module).train(module.training)


def _call_twin(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self._rnnkit_onnx_twin(*args, **kwargs)


@contextlib.contextmanager
def _layers_as_onnx_nodes(module: nn.Module) -> Iterator[None]:
    """Swaps every rnnkit layer's forward for :func:`_export_forward`, with the ONNX-layout
    weights as temporary buffers (they become the ONNX initializers); restores on exit.

    A ``torch.nn.RNN/LSTM/GRU`` inside the module is exported as its rnnkit copy: torch's own
    exporter of those modules fixes the sequence length into a Reshape (torch 2.13), so the file
    would fail at any other length."""
    patched: list[tuple[RecurrentLayer, list[str]]] = []
    twinned: list[nn.Module] = []
    try:
        for owner in list(module.modules()):
            twin = _torch_twin(owner)
            if twin is not None:
                owner.add_module("_rnnkit_onnx_twin", twin)
                owner.forward = types.MethodType(_call_twin, owner)
                twinned.append(owner)
        for layer in module.modules():
            if not isinstance(layer, RecurrentLayer):
                continue
            names = []
            if isinstance(layer, MinimalLayer):
                for name, value in minimal_selection(layer.hidden_size, layer.num_directions).items():
                    layer.register_buffer(f"_onnx_{name}", value, persistent=False)
                    names.append(f"_onnx_{name}")
                layer.forward = types.MethodType(_export_minimal_forward, layer)
                patched.append((layer, names))
                continue
            for index in range(layer.num_layers):
                for name, value in onnx_weights(layer, index).items():
                    layer.register_buffer(f"_onnx_{name}_l{index}", value, persistent=False)
                    names.append(f"_onnx_{name}_l{index}")
            layer.forward = types.MethodType(_export_forward, layer)
            patched.append((layer, names))
        yield
    finally:
        for layer, names in patched:
            del layer.forward
            for name in names:
                del layer._buffers[name]
        for owner in twinned:
            del owner.forward
            del owner._modules["_rnnkit_onnx_twin"]


# ---- pieces with no ONNX form -------------------------------------------------------------------


# (a tree is a data structure, not a tensor axis: no ONNX recurrent operator walks one)
TREE_ENCODER = ("the tree-structured encoder TreeLSTM (the trees task's Tree-LSTM, which combines "
                "each node's children along the parse tree)")


def _no_onnx_form() -> list[tuple[Any, str, str]]:
    """(owner, attribute, what it is) of every rnnkit piece that has no ONNX graph."""
    from rnnkit.decoding import beam, ctc
    from rnnkit.models import crf, generator, language_model, seq2seq, tree_lstm

    return [
        (tree_lstm.TreeLSTM, "forward", TREE_ENCODER),
        (crf.LinearChainCRF, "decode", "CRF Viterbi decoding (LinearChainCRF.decode); export the "
         "emission scores and decode them outside the graph"),
        (seq2seq.Seq2Seq, "beam", "beam search (Seq2Seq.beam); export encode and one decoder step"),
        (seq2seq.Seq2Seq, "greedy", "greedy search (Seq2Seq.greedy); export encode and one "
         "decoder step"),
        (generator.FrameGenerator, "sample", "the sampling loop FrameGenerator.sample"),
        (language_model, "generate", "the sampling loop rnnkit.models.language_model.generate"),
        (language_model, "continue_streams", "the sampling loop "
         "rnnkit.models.language_model.continue_streams"),
        (beam, "beam_search", "beam search (rnnkit.decoding.beam_search)"),
        (beam, "greedy_search", "greedy search (rnnkit.decoding.greedy_search)"),
        (ctc, "greedy_decode", "CTC greedy decoding"),
        (ctc, "prefix_beam_search", "CTC prefix beam search"),
        (ctc, "prefix_beam_search_batch", "CTC prefix beam search"),
        (ctc, "decode_batch", "CTC decoding"),
    ]


@contextlib.contextmanager
def _refuse_pieces_without_onnx_form() -> Iterator[None]:
    """Each piece of :func:`_no_onnx_form` raises ExportError naming it, under every name it is
    reached by: a function is also replaced where a module imported it by name (``from
    rnnkit.decoding import beam_search`` binds the package's and the client's own name to the
    same object, which patching ``rnnkit.decoding.beam`` alone would miss)."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        refusals: dict[int, tuple[Any, Callable[..., Any]]] = {}
        for owner, name, what in _no_onnx_form():
            def refuse(*args: Any, _what: str = what, **kwargs: Any) -> Any:
                raise ExportError(f"{_what} has no ONNX form")
            original = owner.__dict__[name]
            saved.append((owner, name, original))
            setattr(owner, name, refuse)
            if isinstance(owner, types.ModuleType):
                refusals[id(original)] = (original, refuse)
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for name, value in list(namespace.items()):
                found = refusals.get(id(value))
                if found is not None and found[0] is value:
                    saved.append((module, name, value))
                    namespace[name] = found[1]
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


# ---- checks before anything is written -----------------------------------------------------------


def _tensors(value: Any) -> Iterator[tuple[str, Tensor]]:
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(value)
    for path, leaf in leaves:
        if isinstance(leaf, Tensor):
            yield torch.utils._pytree.keystr(path), leaf


def require_exporter() -> None:
    """Raises ExportError naming the packages the exporter needs, if any is missing."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: "
                          "pip install 'rnnkit[onnx]' (or pip install onnx onnxscript)")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_exportable(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raises ExportError naming the first thing that cannot be exported."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.device.type != "cpu":
            raise ExportError(f"parameter {name!r} is on {tensor.device}; export from the CPU "
                              "(module.cpu())")
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ExportError(f"parameter {name!r} is {_dtype(tensor.dtype)}; ONNX runtimes run the "
                              "recurrent operators in float32 (module.float())")
    for name, tensor in _named_inputs(module, args, kwargs):
        if tensor.device.type != "cpu":
            raise ExportError(f"input {name!r} is on {tensor.device}; pass CPU tensors")
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ExportError(f"input {name!r} is {_dtype(tensor.dtype)}; pass float32 inputs")
    for name, sub in module.named_modules():
        if not sub.training:
            continue
        stacked = isinstance(sub, (RecurrentLayer, nn.RNNBase)) and sub.num_layers > 1
        rate = sub.dropout if stacked else (
            sub.p if isinstance(sub, nn.modules.dropout._DropoutNd) else 0.0)
        if rate > 0:
            raise ExportError(f"{name or type(sub).__name__} is in training mode with dropout "
                              f"{rate}; call module.eval() before exporting")
        regularisers = getattr(sub, "regularisers", None) if isinstance(sub, RecurrentLayer) else None
        if regularisers:
            raise ExportError(f"{name or type(sub).__name__} is in training mode with "
                              f"{', '.join(regularisers)}; call module.eval() before exporting")
    for name, sub in module.named_modules():
        if isinstance(sub, RecurrentLayer) and not isinstance(sub, MinimalLayer):
            onnx_form(sub.math.spec)
            # zoneout acts at evaluation too (h_t = z h_{t-1} + (1 - z) h~_t): ONNX's nodes lack it
            zoned = [n for n in ("zoneout", "zoneout_cell") if getattr(sub, n, None)]
            if zoned:
                raise ExportError(f"{name or type(sub).__name__}: {', '.join(zoned)} has no "
                                  "ONNX form (the recurrent nodes have no zoneout)")


def dataclasses_as_dicts(value: Any) -> Any:
    """Model outputs that are dataclasses (e.g. TaggerOutput) as dicts of their non-None fields."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: dataclasses_as_dicts(getattr(value, f.name)) for f in fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, (tuple, list)):
        return type(value)(dataclasses_as_dicts(v) for v in value)
    return value


class _Outputs(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return dataclasses_as_dicts(self.module(*args, **kwargs))


def _all_dims_automatic(value: Any) -> Any:
    """dynamic_shapes for ``torch.export``: every dimension of every tensor input automatic (the
    exporter keeps dynamic what the model lets vary — batch, time — and fixes the rest)."""
    return torch.utils._pytree.tree_map(
        lambda leaf: {d: torch.export.Dim.AUTO for d in range(leaf.dim())}
        if isinstance(leaf, Tensor) else None, value)


def _named_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> list[tuple[str, Tensor]]:
    """The tensor inputs named after ``module.forward``'s parameters (``hx_0``, ``hx_1`` for the
    tensors inside a tuple argument), in the order the exporter flattens them."""
    parameters = list(inspect.signature(module.forward).parameters)
    given = [(parameters[i] if i < len(parameters) else f"input_{i}", value)
             for i, value in enumerate(args)]
    named = []
    for name, value in [*given, *kwargs.items()]:
        if isinstance(value, Tensor):
            named.append((name, value))
        else:
            named += [(f"{name}_{i}", t) for i, (_, t) in enumerate(_tensors(value))]
    return named


def _positional(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Keyword arguments moved into their positions (defaults filling the gaps), so that every
    input is positional: dynamic shapes then match the inputs one to one."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise ExportError(f"the example inputs do not fit {type(module).__name__}.forward: {exc}"
                          ) from None
    bound.apply_defaults()
    return bound.args, bound.kwargs


def export_onnx(
    module: nn.Module,
    args: tuple[Any, ...] | Tensor,
    path: str | os.PathLike[str],
    *,
    kwargs: dict[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset_version: int = 18,
) -> Path:
    """Writes ``module`` called on ``args`` as an ONNX model at ``path``; returns the path.

    ``args`` (and ``kwargs``) are example inputs; every dimension the model lets vary (batch,
    time) stays dynamic in the file, so give batch and time sizes of at least 2. rnnkit layers
    become ONNX ``LSTM``/``GRU``/``RNN`` nodes (see the module docstring); pass ``lengths`` as a
    tensor to make it an input of the graph. The file is written only after the whole export
    succeeded; on any problem an :class:`ExportError` names it and nothing is written.
    """
    if isinstance(args, Tensor):
        args = (args,)
    kwargs = dict(kwargs or {})
    require_exporter()
    check_exportable(module, args, kwargs)
    path = Path(path)
    args, kwargs = _positional(module, args, kwargs)
    names = list(input_names) if input_names else [n for n, _ in _named_inputs(module, args, kwargs)]
    wrapped = _Outputs(module)
    wrapped.training = module.training  # (not .train(): that would switch the module itself)
    # (the wrapper's signature is (*args, **kwargs): dynamic shapes are keyed by those names)
    dynamic = {"args": _all_dims_automatic(args)}
    with _layers_as_onnx_nodes(module), _refuse_pieces_without_onnx_form():
        try:
            program = torch.onnx.export(
                wrapped, args, kwargs=kwargs or None, dynamo=True, external_data=False,
                dynamic_shapes=dynamic, input_names=names,
                output_names=output_names, opset_version=opset_version, verbose=False,
                custom_translation_table=_translation_table(),
            )
        except ExportError:
            raise
        except Exception as exc:
            cause = exc
            while cause.__cause__ is not None:
                if isinstance(cause.__cause__, ExportError):
                    raise cause.__cause__ from None
                cause = cause.__cause__
            first = next((line for line in str(cause).splitlines() if line.strip()), "")
            raise ExportError(f"torch.onnx.export failed: {type(cause).__name__}: "
                              f"{first.strip()}") from exc
    # write to a temporary file first: a failure never leaves a half-written model at path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        program.save(str(temporary))
        # the temporary file was made 0600; the model gets the mode a plain open() would give it
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


__all__ = ["ONNX_FORMS", "ExportError", "check_exportable", "export_onnx", "onnx_weights",
           "require_exporter"]
