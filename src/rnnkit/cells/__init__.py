"""The cells: the math of each recurrent family once, and the one-step API around it."""

from rnnkit.cells.base import CellMath, CellSpec, RecurrentCell
from rnnkit.cells.elman import ElmanMath, RNNCell
from rnnkit.cells.gru import GRUCell, GRUMath
from rnnkit.cells.lstm import LSTMCell, LSTMMath, LSTMState
from rnnkit.cells.stacked import StackedCell

__all__ = [
    "CellMath",
    "CellSpec",
    "ElmanMath",
    "GRUCell",
    "GRUMath",
    "LSTMCell",
    "LSTMMath",
    "LSTMState",
    "RNNCell",
    "RecurrentCell",
    "StackedCell",
]
