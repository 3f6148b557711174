"""rnnkit: recurrent neural networks — every classic cell, correct, fast and usable end to end.

The public surface::

    rnnkit.RNN / rnnkit.LSTM / rnnkit.GRU            sequence layers, drop-in for torch.nn
    rnnkit.RNNCell / LSTMCell / GRUCell / StackedCell  one step at a time
    rnnkit.LSTMState(h, c)                           an LSTM's state
    rnnkit.unroll(cell, inputs, ...)                 any cell over a sequence
    rnnkit.export_onnx(module, args, path)           ONNX with ONNX's own LSTM/GRU/RNN nodes
    rnnkit.MinGRU / MinLSTM (+ ...Cell)             minimal RNNs trained by a parallel scan
    rnnkit.load(run)                                 a trained run: .predict(...), .evaluate(path)
"""

from typing import Any

from rnnkit.cells import GRUCell, LSTMCell, LSTMState, RNNCell, StackedCell
from rnnkit.cells.minimal import MinGRUCell, MinLSTMCell
from rnnkit.engine.unroll import unroll
from rnnkit.export.dynamo import translate_for_torch_onnx
from rnnkit.layers import GRU, LSTM, RNN, MinGRU, MinLSTM
from rnnkit.pipelines import load

# torch.onnx.export(dynamo=True): the fused layers' operator as ONNX's LSTM/GRU/RNN nodes. Here,
# not in the engine (which must not depend on export/): every import of rnnkit runs this file.
translate_for_torch_onnx()

__version__ = "0.1.0"


def export_onnx(*args: Any, **kwargs: Any) -> Any:
    """:func:`rnnkit.export.onnx.export_onnx` (imported on first use: it needs onnxscript)."""
    from rnnkit.export.onnx import export_onnx as export

    return export(*args, **kwargs)


__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "GRUCell",
    "LSTMCell",
    "LSTMState",
    "MinGRU",
    "MinGRUCell",
    "MinLSTM",
    "MinLSTMCell",
    "RNNCell",
    "StackedCell",
    "__version__",
    "export_onnx",
    "load",
    "unroll",
]
