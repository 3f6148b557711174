"""``torch.save(model)`` + ``torch.load(weights_only=True)`` with only rnnkit's module classes
allowlisted, as ``torch.nn.LSTM`` loads: the pickle holds classes, tensors and plain values."""

from __future__ import annotations

import io
import pickletools
import zipfile

import torch
from torch import nn

import rnnkit

LAYER_CLASSES = [rnnkit.RNN, rnnkit.LSTM, rnnkit.GRU, rnnkit.RNNCell, rnnkit.LSTMCell,
                 rnnkit.GRUCell, rnnkit.StackedCell]


def _round_trip(module: nn.Module, allowed: list[type]) -> tuple[nn.Module, bytes]:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    data = buffer.getvalue()
    with torch.serialization.safe_globals(allowed):
        loaded = torch.load(io.BytesIO(data), weights_only=True)
    return loaded, data


def _pickled_globals(data: bytes) -> set[str]:
    """The module.name of every class or function the pickle refers to."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        ops = list(pickletools.genops(archive.read(name)))
    found, strings = set(), []
    for opcode, arg, _ in ops:
        if opcode.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return found


def test_every_layer_variant_loads_with_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        rnnkit.LSTM(3, 4, peephole=True, bidirectional=True),
        rnnkit.LSTM(8, 4, coupled=True, peephole=True, num_layers=2),
        rnnkit.GRU(4, 5, reset="before"),
        rnnkit.RNN(5, 3, nonlinearity="sigmoid", batch_first=False),
    ).eval()
    loaded, data = _round_trip(model, [nn.Sequential, *LAYER_CLASSES])
    assert not any("Math" in name for name in _pickled_globals(data))
    x = torch.randn(6, 2, 3)
    want = x
    got = x
    for layer, twin in zip(model, loaded):
        assert type(twin) is type(layer) and twin.math.spec == layer.math.spec
        want, _ = layer(want)
        got, _ = twin(got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cells_load_with_weights_only():
    torch.manual_seed(0)
    cell = rnnkit.StackedCell([rnnkit.LSTMCell(3, 4, coupled=True), rnnkit.GRUCell(4, 4, reset="before"),
                               rnnkit.RNNCell(4, 2, nonlinearity="relu")])
    loaded, data = _round_trip(cell, [nn.ModuleList, *LAYER_CLASSES])
    assert not any("Math" in name for name in _pickled_globals(data))
    x = torch.randn(2, 3)
    torch.testing.assert_close(loaded(x)[0], cell(x)[0], rtol=0, atol=0)


def test_deepcopy_keeps_the_variant():
    import copy

    layer = rnnkit.GRU(3, 4, reset="before")
    twin = copy.deepcopy(layer)
    assert twin.math.spec == layer.math.spec and twin.math is not layer.math
