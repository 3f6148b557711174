"""The cells: the math of each recurrent family once, and the one-step API around it."""

from rnnkit.cells.base import CellMath, CellSpec, RecurrentCell
from rnnkit.cells.elman import ElmanMath, RNNCell
from rnnkit.cells.gru import GRUCell, GRUMath
from rnnkit.cells.layer_norm import LayerNormGRUMath, LayerNormLSTMMath
from rnnkit.cells.lstm import LSTMCell, LSTMMath, LSTMState
from rnnkit.cells.stacked import StackedCell


def math_for(spec: CellSpec) -> CellMath:
    """The math object of a cell variant (how a pickled layer or cell rebuilds its math)."""
    if spec.layer_norm and spec.kind not in ("lstm", "gru"):
        raise ValueError(f"layer_norm is an LSTM and GRU option, not one of {spec.kind!r}")
    if spec.kind == "rnn":
        return ElmanMath(spec.nonlinearity)
    if spec.kind == "lstm":
        if spec.layer_norm:
            if spec.projection:
                raise ValueError("layer_norm with a projection (proj_size) is not implemented")
            return LayerNormLSTMMath(spec.peephole, spec.coupled)
        return LSTMMath(spec.peephole, spec.coupled, spec.projection)
    if spec.kind == "gru":
        return LayerNormGRUMath(spec.reset) if spec.layer_norm else GRUMath(spec.reset)
    raise ValueError(f"unknown cell kind {spec.kind!r}")


__all__ = [
    "CellMath",
    "CellSpec",
    "ElmanMath",
    "GRUCell",
    "GRUMath",
    "LSTMCell",
    "LSTMMath",
    "LSTMState",
    "LayerNormGRUMath",
    "LayerNormLSTMMath",
    "RNNCell",
    "RecurrentCell",
    "StackedCell",
    "math_for",
]
