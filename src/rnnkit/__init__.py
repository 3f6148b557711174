"""rnnkit: recurrent neural networks — every classic cell, correct, fast and usable end to end.

The public surface::

    rnnkit.RNN / rnnkit.LSTM / rnnkit.GRU            sequence layers, drop-in for torch.nn
    rnnkit.RNNCell / LSTMCell / GRUCell / StackedCell  one step at a time
    rnnkit.LSTMState(h, c)                           an LSTM's state
    rnnkit.unroll(cell, inputs, ...)                 any cell over a sequence
    rnnkit.load(run)                                 a trained run: .predict(...), .evaluate(path)
"""

from rnnkit.cells import GRUCell, LSTMCell, LSTMState, RNNCell, StackedCell
from rnnkit.engine.unroll import unroll
from rnnkit.layers import GRU, LSTM, RNN
from rnnkit.pipelines import load

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "GRUCell",
    "LSTMCell",
    "LSTMState",
    "RNNCell",
    "StackedCell",
    "__version__",
    "load",
    "unroll",
]
