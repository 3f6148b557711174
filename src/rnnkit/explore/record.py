"""Recording what every recurrent layer computes: h, c and each gate, per layer and direction.

The recording runs each layer's *own cell math* (:meth:`CellMath.step`, the reference the engine's
backends are tested against) step by step with the trained weights, and reads the gate values
from the cache the step returns for its backward. Nothing here re-states a gate equation, so a
recorded gate is by construction the gate the cell computes; the tests check that the recorded
``h`` and ``c`` equal the layer's own outputs.

Models are not changed: :class:`Recorder` puts a forward hook on every
:class:`~rnnkit.layers.RecurrentLayer` inside a model and replays each call it sees (the input,
the initial state) through the cell math. A decoder called one step at a time (seq2seq) gives one
call per step; :meth:`Recorder.traces` joins them along time.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from rnnkit.cells.base import CellMath
from rnnkit.cells.minimal import MinimalMath
from rnnkit.engine import regularise
from rnnkit.engine.regularise import recurrent_masks
from rnnkit.layers import MinimalLayer, RecurrentLayer

# the order quantities are offered in the page, per family (names as in the cell docstrings)
QUANTITIES = {"lstm": ("h", "c", "i", "f", "g", "o"), "gru": ("h", "z", "r", "n"), "rnn": ("h",),
              "treelstm": ("h", "c", "i", "f1", "f2", "o", "u"), "mingru": ("h", "a", "b"),
              "minlstm": ("h", "a", "b")}
# the gates squashed into (0, 1): the ones whose saturation (Karpathy et al. 2016, Fig. 3) means
# something; g, n, u and h are tanh-valued. A Tree-LSTM has one forget gate per child (f1 left,
# f2 right in a binary tree)
GATES = {"lstm": ("i", "f", "o"), "gru": ("z", "r"), "rnn": (), "treelstm": ("i", "f1", "f2", "o"),
         "mingru": ("a",), "minlstm": ("a",)}
LABELS = {"h": "hidden state h", "c": "cell state c", "i": "input gate i", "f": "forget gate f",
          "g": "candidate g", "o": "output gate o", "z": "update gate z", "r": "reset gate r",
          "n": "candidate n", "u": "candidate u", "f1": "forget gate of child 1 (left)",
          "f2": "forget gate of child 2 (right)",
          # minGRU / minLSTM: the linear recurrence h_t = a_t ⊙ h_{t−1} + b_t the scan runs
          "a": "kept fraction a (minGRU 1 − z, minLSTM f')", "b": "written term b"}


def quantities_of(math: CellMath | MinimalMath) -> tuple[str, ...]:
    return QUANTITIES[math.kind]


def step_values(math: CellMath, state: tuple[Tensor, ...], cache: Any) -> dict[str, Tensor]:
    """The named values of one step of ``math``: the new state plus the gates in its cache."""
    values = dict(zip(math.state_names, state))
    if math.kind == "lstm":  # _LSTMCache; a coupled cell's f is 1 − i, already in the cache
        values.update(i=cache.i, f=cache.f, g=cache.g, o=cache.o)
    elif math.kind == "gru":  # _GRUCache
        values.update(r=cache.r, z=cache.z, n=cache.n)
    return values


@dataclass
class Trace:
    """Everything one layer and direction computed over one sequence: name → (T, H)."""

    layer: int
    direction: int  # 0 forward, 1 reverse
    kind: str
    values: dict[str, Tensor] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return next(iter(self.values.values())).shape[0]


def record_layer(layer: RecurrentLayer, x: Tensor, hx: Any = None) -> list[Trace]:
    """Replays ``layer`` on one unbatched sequence ``x`` (T, I) from state ``hx`` (as the layer
    takes it, unbatched: (L·D, H) each, or None) and returns one :class:`Trace` per layer and
    direction, in the layer's order (layer 0 forward, layer 0 reverse, layer 1 forward, …).

    A reverse direction is recorded in input order: row t is the step that read x_t."""
    if isinstance(layer, MinimalLayer):
        return _record_minimal(layer, x, hx)
    math = layer.math
    depth = layer.num_layers * layer.num_directions
    dtype = x.dtype
    if hx is None:
        states0 = [x.new_zeros(depth, layer.hidden_size) for _ in math.state_names]
    else:
        states0 = [hx] if isinstance(hx, Tensor) else list(hx)
    traces: list[Trace] = []
    layer_input = x
    with torch.no_grad():
        for number in range(layer.num_layers):
            outputs = []
            for direction in range(layer.num_directions):
                w_ih, w_hh, b_ih, b_hh, *diag = [
                    None if p is None else p.to(dtype) for p in layer.layer_params(number, direction)]
                index = number * layer.num_directions + direction
                source = layer_input.flip(0) if direction == 1 else layer_input
                gx = F.linear(source, w_ih, b_ih)  # (T, G·H): the engine's one input GEMM
                state = tuple(s[index].unsqueeze(0) for s in states0)
                # zoneout acts at evaluation too (its expectation); the dropouts do not
                zoneout_c = layer.zoneout if layer.zoneout_cell is None else layer.zoneout_cell
                masks = recurrent_masks(False, source.unsqueeze(1), len(state), layer.hidden_size,
                                        0.0, layer.zoneout, zoneout_c)
                steps: dict[str, list[Tensor]] = {}
                for t in range(source.shape[0]):
                    state, cache = regularise.step(math, gx[t:t + 1], state, w_hh, b_hh, diag,
                                                   masks, t)
                    state = tuple(state)
                    for name, value in step_values(math, state, cache).items():
                        steps.setdefault(name, []).append(value[0])
                values = {name: torch.stack(steps[name]) if steps else
                          x.new_zeros(0, layer.hidden_size) for name in quantities_of(math)}
                if direction == 1:
                    values = {name: value.flip(0) for name, value in values.items()}
                traces.append(Trace(number, direction, math.kind, values))
                outputs.append(values["h"])
            layer_input = torch.cat(outputs, dim=1)  # (T, D·H): the next layer's input
    return traces


def _record_minimal(layer: MinimalLayer, x: Tensor, hx: Tensor | None) -> list[Trace]:
    """:func:`record_layer` for minGRU / minLSTM layers: the coefficients of the linear recurrence
    h_t = a_t ⊙ h_{t−1} + b_t from the layer's own :meth:`MinimalMath.coefficients` (what its
    scan runs on) and h from :meth:`MinimalMath.step`, one step at a time."""
    math = layer.math
    states0 = x.new_zeros(layer.num_layers * layer.num_directions, layer.hidden_size) if (
        hx is None) else (hx if isinstance(hx, Tensor) else hx[0])
    traces: list[Trace] = []
    layer_input = x
    with torch.no_grad():
        for number in range(layer.num_layers):
            outputs = []
            for direction in range(layer.num_directions):
                index = number * layer.num_directions + direction
                weight, *bias = [layer._parameters[name].to(x.dtype)
                                 for name in layer._param_names[index]]
                source = layer_input.flip(0) if direction == 1 else layer_input
                gx = F.linear(source, weight, bias[0] if bias else None)  # (T, G·H)
                log_a, log_b = math.coefficients(gx)
                h, rows = states0[index], []
                for t in range(source.shape[0]):
                    h = math.step(gx[t], h)
                    rows.append(h)
                values = {"h": torch.stack(rows) if rows else x.new_zeros(0, layer.hidden_size),
                          "a": log_a.exp(), "b": log_b.exp()}
                if direction == 1:
                    values = {name: value.flip(0) for name, value in values.items()}
                traces.append(Trace(number, direction, math.kind, values))
                outputs.append(values["h"])
            layer_input = torch.cat(outputs, dim=1)
    return traces


@dataclass
class _Call:
    x: Tensor  # (T, I), one sequence
    hx: Any  # unbatched initial state or None
    output: Tensor  # (T, D·H): what the layer returned, for the check


class Recorder:
    """Collects the calls of every recurrent layer of ``model`` while it runs on one input.

    ``with Recorder(model) as rec: model(...)`` — then ``rec.traces()``. Only batches of one
    sequence are recorded (the explorer runs one input at a time); a padded batch of one is cut
    to its length.
    """

    def __init__(self, model: nn.Module, only: Collection[str] | None = None) -> None:
        # ``only``: the layers to record by module name (a tagger's character BiRNN reads every
        # word as a batch of its own and is left out)
        self.layers = {name or "rnn": module for name, module in model.named_modules()
                       if isinstance(module, RecurrentLayer) and (only is None or name in only)}
        self.calls: dict[str, list[_Call]] = {name: [] for name in self.layers}
        self._handles: list[Any] = []

    def __enter__(self) -> Recorder:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        def hook(module: RecurrentLayer, args: tuple[Any, ...], kwargs: dict[str, Any],
                 result: Any) -> None:
            self.calls[name].append(_one_sequence(module, args, kwargs, result))
        return hook

    def bytes_needed(self) -> int:
        """The memory the recorded values of the calls seen so far will take."""
        total = 0
        for name, calls in self.calls.items():
            layer = self.layers[name]
            per_step = (layer.num_layers * layer.num_directions * layer.hidden_size
                        * len(quantities_of(layer.math)))
            for call in calls:
                total += per_step * call.x.shape[0] * call.x.element_size()
        return total

    def traces(self) -> dict[str, list[Trace]]:
        """Per layer module: its traces, calls joined along time (one call per decoder step)."""
        out: dict[str, list[Trace]] = {}
        for name, calls in self.calls.items():
            if not calls:
                continue
            recorded = [record_layer(self.layers[name], call.x, call.hx) for call in calls]
            joined = []
            for parts in zip(*recorded):
                values = {key: torch.cat([p.values[key] for p in parts]) for key in parts[0].values}
                joined.append(Trace(parts[0].layer, parts[0].direction, parts[0].kind, values))
            out[name] = joined
        return out

    def outputs(self, name: str) -> Tensor:
        """What the layer itself returned over all its calls, (T, D·H)."""
        return torch.cat([call.output for call in self.calls[name]])


def _one_sequence(module: RecurrentLayer, args: tuple[Any, ...], kwargs: dict[str, Any],
                  result: Any) -> _Call:
    """The first sequence of one call of ``module``: input (T, I), initial state, output."""
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    lengths = args[2] if len(args) > 2 else kwargs.get("lengths")
    output = result[0]
    if isinstance(x, PackedSequence):
        x, lengths = pad_packed_sequence(x)
        output, _ = pad_packed_sequence(output)
    unbatched = x.dim() == 2
    if not unbatched:
        if module.batch_first:
            x, output = x.transpose(0, 1), output.transpose(0, 1)
        if x.shape[1] != 1:
            raise ValueError(f"the explorer records one sequence at a time, got a batch of "
                             f"{x.shape[1]}")
        x, output = x[:, 0], output[:, 0]
        if hx is not None:
            hx = hx[:, 0] if isinstance(hx, Tensor) else tuple(h[:, 0] for h in hx)
    if lengths is not None:
        steps = int(torch.as_tensor(lengths).reshape(-1)[0])
        x, output = x[:steps], output[:steps]
    return _Call(x.detach(), hx if hx is None else (
        hx.detach() if isinstance(hx, Tensor) else tuple(h.detach() for h in hx)), output.detach())

