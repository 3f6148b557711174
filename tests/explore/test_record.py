"""The recording replays each layer's own cell math: its h and c must equal the layer's outputs."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from conftest import VARIANTS
from rnnkit.explore.record import GATES, Recorder, record_layer


def _layer(variant: str, layers: int, bidirectional: bool) -> rnnkit.layers.RecurrentLayer:
    layer_class, _, options = VARIANTS[variant]
    return layer_class(3, 5, num_layers=layers, bidirectional=bidirectional, **options).double()


@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, True)])
def test_recorded_states_equal_the_layers_outputs(variant: str, layers: int,
                                                  bidirectional: bool) -> None:
    layer = _layer(variant, layers, bidirectional)
    x = torch.randn(7, 3, dtype=torch.float64)
    hx = tuple(torch.randn(layers * layer.num_directions, 5, dtype=torch.float64)
               for _ in layer.math.state_names)
    output, final = layer(x, hx if len(hx) == 2 else hx[0])
    final = final if isinstance(final, tuple) else (final,)
    traces = record_layer(layer, x, hx)
    assert [(t.layer, t.direction) for t in traces] == [
        (n, d) for n in range(layers) for d in range(layer.num_directions)]
    top = [t for t in traces if t.layer == layers - 1]
    torch.testing.assert_close(torch.cat([t.values["h"] for t in top], dim=1), output)
    for index, trace in enumerate(traces):
        last = 0 if trace.direction == 1 else -1  # a reverse direction ends at x_0
        for name, state in zip(layer.math.state_names, final):
            torch.testing.assert_close(trace.values[name][last], state[index])
    # the lower layers' outputs: a stack cut after that layer, with the same weights
    for number in range(layers - 1):
        cut = _layer(variant, number + 1, bidirectional)
        cut.load_state_dict({k: v for k, v in layer.state_dict().items()
                             if int(k.split("_l")[1].split("_")[0]) <= number})
        cut_output, _ = cut(x, tuple(h[: (number + 1) * layer.num_directions] for h in hx)
                            if len(hx) == 2 else hx[0][: (number + 1) * layer.num_directions])
        lower = [t.values["h"] for t in traces if t.layer == number]
        torch.testing.assert_close(torch.cat(lower, dim=1), cut_output)
    # gates are in (0, 1); a coupled LSTM's forget gate is 1 − i
    for trace in traces:
        for gate in GATES[trace.kind]:
            assert trace.values[gate].min() > 0 and trace.values[gate].max() < 1
        if variant.startswith("lstm_") and "coupled" in variant:
            torch.testing.assert_close(trace.values["f"], 1 - trace.values["i"])


def test_gates_recompute_the_lstm_equations() -> None:
    """An independent check of the gate rows: torch.nn.LSTMCell's equations, written out."""
    torch_lstm = torch.nn.LSTM(3, 4).double()
    layer = rnnkit.LSTM.from_torch(torch_lstm)
    x = torch.randn(5, 3, dtype=torch.float64)
    (trace,) = record_layer(layer, x)
    h = c = torch.zeros(4, dtype=torch.float64)
    for t in range(5):
        pre = torch_lstm.weight_ih_l0 @ x[t] + torch_lstm.bias_ih_l0 + (
            torch_lstm.weight_hh_l0 @ h + torch_lstm.bias_hh_l0)
        i, f, g, o = pre.detach().chunk(4)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        for name, value in dict(i=i, f=f, g=g, o=o, c=c, h=h).items():
            torch.testing.assert_close(trace.values[name][t], value)


def test_recorder_hooks_every_call_and_joins_steps() -> None:
    """A model calling its layer one step at a time (a decoder) is recorded as one sequence."""
    layer = rnnkit.GRU(3, 4, num_layers=2).double()
    x = torch.randn(6, 1, 3, dtype=torch.float64)
    whole, _ = layer(x)
    model = torch.nn.Module()
    model.rnn = layer
    with Recorder(model) as recorder:
        state = None
        for t in range(6):
            _, state = layer(x[t:t + 1], state)
    (name,) = recorder.traces()
    traces = recorder.traces()[name]
    torch.testing.assert_close(traces[-1].values["h"], whole[:, 0])
    assert traces[0].steps == 6


def test_recorder_refuses_a_batch() -> None:
    layer = rnnkit.RNN(3, 4)
    model = torch.nn.Sequential(layer)
    with Recorder(model), pytest.raises(ValueError, match="one sequence at a time"):
        layer(torch.randn(2, 2, 3))
