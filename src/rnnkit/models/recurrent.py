"""The recurrent part every model shares: which cell, how deep, how wide, which direction.

Models (language model, acoustic model, tagger, classifier, seq2seq) describe their recurrent
stack with a :class:`RecurrentConfig` and build it with :func:`build_recurrent`, so every cell
variant and option is available to every task in the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.layers import GRU, LSTM, RNN, MinGRU, MinLSTM
from rnnkit.models.tcn import TCN
from rnnkit.options import Options, option

# the recurrent cells, the minimal RNNs trained by a parallel scan, and the convolutional contrast
CELLS = ("lstm", "gru", "rnn", "mingru", "minlstm", "tcn")
GATED = ("lstm", "gru", "mingru", "minlstm")  # the cells whose gate biases chrono initialises
RESETS = ("after", "before")
NONLINEARITIES = ("tanh", "relu", "sigmoid", "identity")
ORTHOGONAL = ("exp", "cayley")  # rnnkit.RNN(orthogonal=...): how W_hh is kept orthogonal
REGULARISERS = ("recurrent_dropout", "input_dropout", "zoneout", "zoneout_cell", "weight_drop")


# The cell's options, declared by RecurrentConfig and by LMConfig (whose fields are flat, as its
# saved configs and flags are): default, help and range written once here, a field of either made
# by cell_option(name). (Each class keeps its own field order: saved configs list fields in it.)
CELL_OPTIONS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "peephole": (False, "LSTM with peephole connections (Gers & Schmidhuber 2000)", {}),
    "coupled": (False, "LSTM with coupled input-forget gates (CIFG)", {}),
    "forget_bias": (None, "LSTM: initial forget-gate bias (none: the layer's default)", {}),
    "chrono": (None, "chrono initialisation of the gate biases (Tallec & Ollivier 2018) for "
                     "dependencies up to this many steps (T_max): keep-gate biases "
                     "log U[1, T_max - 1]; lstm, gru, mingru, minlstm", {"ge": 2}),
    "reset": ("after", "GRU reset gate 'after' (torch/cuDNN) or 'before' (Cho 2014)",
              {"choices": RESETS}),
    "nonlinearity": ("tanh", "Elman RNN nonlinearity", {"choices": NONLINEARITIES}),
    "orthogonal": (None, "rnn: keep W_hh orthogonal, W = B exp(A - A^T) (exp: expRNN) or the "
                         "Cayley map (cayley); starts from Henaff's rotations",
                   {"choices": ORTHOGONAL}),
    "kernel_size": (3, "TCN only: kernel size of its causal convolutions", {"ge": 2}),
    # the recurrent regularisers (rnnkit.engine.regularise; lstm, gru and rnn cells)
    "recurrent_dropout": (0.0, "variational dropout on h_{t-1} (one mask per sequence; Gal & "
                               "Ghahramani 2016)", {"ge": 0, "lt": 1}),
    "input_dropout": (0.0, "variational dropout on each layer's input x_t (one mask per "
                           "sequence)", {"ge": 0, "lt": 1}),
    "zoneout": (0.0, "zoneout rate of h (Krueger et al. 2017)", {"ge": 0, "lt": 1}),
    "zoneout_cell": (None, "LSTM: zoneout rate of c (none: the zoneout rate)", {"ge": 0, "lt": 1}),
    "weight_drop": (0.0, "DropConnect on the recurrent weights W_hh, one mask per forward "
                         "(AWD-LSTM's weight drop)", {"ge": 0, "lt": 1}),
    "layer_norm": (False, "LSTM/GRU: layer-normalised cell (Ba, Kiros & Hinton 2016)", {}),
}


def cell_option(name: str) -> Any:
    """The dataclass field of the cell option ``name`` (:data:`CELL_OPTIONS`)."""
    default, help, rule = CELL_OPTIONS[name]
    return option(default, help, **rule)


def cell_options_of(config: Any) -> dict[str, Any]:
    """The cell options of a config that declares them (RecurrentConfig's keyword arguments)."""
    return {name: getattr(config, name) for name in CELL_OPTIONS}


@dataclass
class RecurrentConfig(Options):
    cell: str = option("lstm", "recurrent cell (mingru, minlstm: parallel scan; tcn: "
                               "convolutional)", choices=CELLS)
    layers: int = option(2, "stacked recurrent layers (tcn: residual blocks)", ge=1)
    hidden: int = option(128, "hidden units per layer (per direction; tcn: channels)", ge=1)
    bidirectional: bool = option(False, "read each sequence in both directions")
    dropout: float = option(0.0, "dropout between stacked layers (tcn: inside each block)", ge=0,
                            lt=1)
    peephole: bool = cell_option("peephole")
    coupled: bool = cell_option("coupled")
    forget_bias: float | None = cell_option("forget_bias")
    chrono: float | None = cell_option("chrono")
    reset: str = cell_option("reset")
    nonlinearity: str = cell_option("nonlinearity")
    orthogonal: str | None = cell_option("orthogonal")
    kernel_size: int = cell_option("kernel_size")
    recurrent_dropout: float = cell_option("recurrent_dropout")
    input_dropout: float = cell_option("input_dropout")
    zoneout: float = cell_option("zoneout")
    zoneout_cell: float | None = cell_option("zoneout_cell")
    weight_drop: float = cell_option("weight_drop")
    layer_norm: bool = cell_option("layer_norm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.peephole or self.coupled or self.forget_bias is not None) and self.cell != "lstm":
            raise ValueError("peephole, coupled and forget_bias are LSTM options")
        check_regularisers(self.cell, self.regularisers)
        check_chrono(self.cell, self.chrono, self.forget_bias)
        check_orthogonal(self.cell, self.orthogonal)
        if self.layer_norm and self.cell not in ("lstm", "gru"):
            raise ValueError(f"layer_norm is an LSTM and GRU option, not one of cell={self.cell}")
        if self.layer_norm and (self.recurrent_dropout or self.zoneout or self.zoneout_cell):
            raise ValueError("recurrent_dropout and zoneout are not implemented with layer_norm")
        if self.kernel_size < 2:
            raise ValueError(f"kernel_size must be at least 2, got {self.kernel_size}")

    @property
    def output_size(self) -> int:
        return self.hidden * (2 if self.bidirectional else 1)

    @property
    def regularisers(self) -> dict[str, float]:
        """The recurrent regularisers that are set, as layer keyword arguments."""
        return regularisers_of(self)


def regularisers_of(config: Any) -> dict[str, float]:
    """The regularisers set in a config with the fields of :class:`RecurrentConfig`."""
    values = {name: getattr(config, name) for name in REGULARISERS}
    return {name: value for name, value in values.items() if value}


def check_regularisers(cell: str, regularisers: dict[str, float]) -> None:
    """One line naming the option if a regulariser is set for a cell that has no such option."""
    if regularisers and cell not in ("lstm", "gru", "rnn"):
        raise ValueError(f"{', '.join(regularisers)}: options of the lstm, gru and rnn cells, "
                         f"not of {cell}")
    if "zoneout_cell" in regularisers and cell != "lstm":
        raise ValueError("zoneout_cell is an LSTM option (the rate of its cell state c)")


def check_chrono(cell: str, chrono: float | None, forget_bias: float | None) -> None:
    """One line naming the conflict if ``chrono`` is set where it has no meaning."""
    if chrono is None:
        return
    if cell not in GATED:
        raise ValueError(f"chrono sets gate biases: an option of the {', '.join(GATED)} cells, "
                         f"not of {cell}")
    if forget_bias is not None:
        raise ValueError("forget_bias and chrono both set the forget-gate bias; give one")


def check_orthogonal(cell: str, orthogonal: str | None) -> None:
    """One line if ``orthogonal`` is set for a cell whose W_hh is not one square matrix."""
    if orthogonal is not None and cell != "rnn":
        raise ValueError(f"orthogonal keeps the Elman RNN's square W_hh orthogonal: an option of "
                         f"the rnn cell, not of {cell}")


def build_recurrent(config: RecurrentConfig, input_size: int) -> nn.Module:
    """The rnnkit sequence layer described by ``config`` (time-major, like torch.nn).

    Every one has the call ``output, state = layer(x, state, lengths=...)``.
    """
    if config.cell == "tcn":  # its dropout acts inside each block, so one block may have it
        return TCN(input_size, config.hidden, config.layers, config.kernel_size, config.dropout,
                   config.bidirectional)
    common = dict(num_layers=config.layers, dropout=config.dropout if config.layers > 1 else 0.0,
                  bidirectional=config.bidirectional)
    if config.cell in ("mingru", "minlstm"):
        return (MinGRU if config.cell == "mingru" else MinLSTM)(input_size, config.hidden,
                                                                 chrono=config.chrono, **common)
    common.update(config.regularisers)
    if config.chrono is not None:  # (RecurrentConfig allows it for the gated cells only)
        common.update(chrono=config.chrono)
    if config.cell == "lstm":
        return LSTM(input_size, config.hidden, peephole=config.peephole, coupled=config.coupled,
                    forget_bias=config.forget_bias,
                    layer_norm=config.layer_norm,
                    **common)
    if config.cell == "gru":
        return GRU(input_size, config.hidden, reset=config.reset,
                   layer_norm=config.layer_norm,
                   **common)
    return RNN(input_size, config.hidden, nonlinearity=config.nonlinearity,
               orthogonal=config.orthogonal, **common)


def final_hidden(state: Any, bidirectional: bool) -> Tensor:
    """The top layer's final h from a layer's state ((L·D, B, H) or LSTM (h, c)): (B, D·H)."""
    h = state[0] if isinstance(state, tuple) else state  # (L·D, B, H)
    if bidirectional:
        return torch.cat((h[-2], h[-1]), dim=1)  # (B, 2H): forward, backward of the top layer
    return h[-1]  # (B, H)
