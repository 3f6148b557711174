"""Temporal convolutional network (Bai, Kolter & Koltun 2018): the convolutional sequence model.

A stack of residual blocks; block ``i`` holds two causal 1-D convolutions of kernel size k and
dilation ``2^i`` with weight normalisation, ReLU and dropout, and adds its input back (through a
1×1 convolution where the widths differ)::

    y = ReLU(x + dropout(ReLU(WN-conv_d(dropout(ReLU(WN-conv_d(x)))))))

"Causal" means the output at step t reads inputs t − R + 1 … t only, where the receptive field is
``R = 1 + 2 (k − 1) (2^L − 1)`` for L blocks; padding is on the left.

:class:`TCN` has the call of rnnkit's recurrent layers — ``output, state = tcn(x, state,
lengths=...)`` on (T, B, I) — so every task can use it (``cell: tcn``). Its *state* is
``(h_n, *histories)``: ``h_n`` (D, B, C) is the output at each sequence's last step (what a
classifier pools as "final"), and each history (B, C_in, (k − 1)·d) holds the last inputs one
convolution needs from before the window: the queues of fast WaveNet generation. Passing the state
of one call to the next makes a long stream cut into windows — truncated BPTT, or generation one
step at a time — give exactly the outputs of one call on the whole stream; no state (or zero
histories) is the zero padding of a fresh sequence. ``bidirectional=True`` adds a second TCN
reading each sequence backwards (within its length); it is for tagging and classification, where
the whole input is known, not for streams.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from rnnkit.engine.lengths import reverse_within_lengths
from rnnkit.validation import check_lengths, check_sequence


def receptive_field(levels: int, kernel_size: int) -> int:
    """Input steps one output of an L-block TCN reads (two convolutions per block)."""
    return 1 + 2 * (kernel_size - 1) * (2**levels - 1)


def _history_after(full: Tensor, ends: Tensor, width: int) -> Tensor:
    """The ``width`` frames of ``full`` (B, C, P + T) just before each row's end (B,): (B, C, width)."""
    index = ends.view(-1, 1) + torch.arange(width, device=full.device)  # row b: [end_b, end_b + P)
    return full.gather(2, index.unsqueeze(1).expand(full.shape[0], full.shape[1], width))


class CausalConv(nn.Module):
    """A weight-normalised dilated 1-D convolution that reads only the past: (B, C, T) → (B, C', T).

    ``history`` (B, C, (k − 1)·d) is what precedes the window (zeros: a fresh sequence, which is
    the left zero padding of Bai et al.); the history for the next window is returned too.
    """

    def __init__(self, channels_in: int, channels_out: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        conv = nn.Conv1d(channels_in, channels_out, kernel_size, dilation=dilation)
        nn.init.normal_(conv.weight, 0.0, 0.01)  # Bai et al.'s initialisation
        self.conv = weight_norm(conv)
        # w = g v / ‖v‖ does not depend on the scale of v: weight decay belongs on g only (the
        # Trainer honours this flag). Decayed v of a dead channel shrank until ‖v‖² underflowed
        # to 0 and w became inf (tests/models/test_model_tcn.py pins it).
        self.conv.parametrizations.weight.original1.no_weight_decay = True

    def forward(self, x: Tensor, history: Tensor | None, ends: Tensor) -> tuple[Tensor, Tensor]:
        if history is None:
            history = x.new_zeros(x.shape[0], x.shape[1], self.left_pad)
        full = torch.cat((history, x), dim=2)  # (B, C, P + T)
        return self.conv(full), _history_after(full, ends, self.left_pad)


class TemporalBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, kernel_size: int, dilation: int,
                 dropout: float) -> None:
        super().__init__()
        self.conv1 = CausalConv(channels_in, channels_out, kernel_size, dilation)
        self.conv2 = CausalConv(channels_out, channels_out, kernel_size, dilation)
        self.dropout = nn.Dropout(dropout)
        self.downsample = nn.Conv1d(channels_in, channels_out, 1) if channels_in != channels_out else None

    def forward(self, x: Tensor, histories: list[Tensor | None], ends: Tensor
                ) -> tuple[Tensor, list[Tensor]]:  # (B, C_in, T) → (B, C_out, T)
        y, first = self.conv1(x, histories[0], ends)
        y = self.dropout(F.relu(y))
        y, second = self.conv2(y, histories[1], ends)
        y = self.dropout(F.relu(y))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(y + residual), [first, second]


class CausalStack(nn.Module):
    """One direction: ``levels`` temporal blocks with dilations 1, 2, 4, …"""

    def __init__(self, input_size: int, channels: int, levels: int, kernel_size: int,
                 dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TemporalBlock(input_size if i == 0 else channels, channels, kernel_size, 2**i, dropout)
            for i in range(levels)
        )

    def forward(self, x: Tensor, histories: list[Tensor] | None, ends: Tensor
                ) -> tuple[Tensor, list[Tensor]]:  # (B, I, T) → (B, C, T), next histories
        new: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            given = [None, None] if histories is None else histories[2 * i: 2 * i + 2]
            x, made = block(x, given, ends)
            new += made
        return x, new

    def history_shapes(self, batch: int) -> list[tuple[int, int, int]]:
        return [(batch, conv.conv.in_channels, conv.left_pad)
                for block in self.blocks for conv in (block.conv1, block.conv2)]
class TCN(nn.Module):
    """A causal TCN with the call of rnnkit's layers (see the module docstring)."""

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 4, kernel_size: int = 3,
        dropout: float = 0.0, bidirectional: bool = False, batch_first: bool = False,
    ) -> None:
        super().__init__()
        if min(input_size, hidden_size, num_layers) <= 0 or kernel_size < 2:
            raise ValueError(
                "input_size, hidden_size and num_layers must be positive and kernel_size at least "
                f"2, got {input_size}, {hidden_size}, {num_layers} and {kernel_size}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.kernel_size, self.bidirectional, self.batch_first = kernel_size, bidirectional, batch_first
        self.receptive_field = receptive_field(num_layers, kernel_size)
        self.directions = nn.ModuleList(
            CausalStack(input_size, hidden_size, num_layers, kernel_size, dropout)
            for _ in range(2 if bidirectional else 1)
        )

    def forward(
        self, x: Tensor, hx: tuple[Tensor, ...] | None = None,
        lengths: Sequence[int] | Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``output (T, B, D·C), (h_n (D, B, C), *histories)`` for x (T, B, I)."""
        check_sequence("input", x, self.input_size, self.directions[0].blocks[0].conv1.conv.bias.dtype)
        if x.dim() != 3:
            raise ValueError(f"TCN input must be 3-D, got shape {tuple(x.shape)}")
        if self.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        if lengths is not None:
            lengths = check_lengths(lengths, batch, steps, x.device)
        ends = (lengths.to(x.device) if lengths is not None
                else torch.full((batch,), steps, device=x.device, dtype=torch.long))
        histories = None
        if hx is not None:
            if self.bidirectional:
                raise ValueError("a bidirectional TCN reads whole sequences: it takes no state")
            histories = list(hx[1:])
            expected = self.directions[0].history_shapes(batch)
            given = [tuple(h.shape) for h in histories]
            if given != expected:
                raise ValueError(f"TCN state histories must have shapes {expected}, got {given}")
        out, new_histories = self.directions[0](x.permute(1, 2, 0), histories, ends)  # (B, C, T)
        outputs = [out]
        if self.bidirectional:
            backwards = reverse_within_lengths(x, lengths).permute(1, 2, 0)  # (B, I, T)
            out, _ = self.directions[1](backwards, None, ends)
            outputs.append(reverse_within_lengths(out.permute(2, 0, 1), lengths).permute(1, 2, 0))
        output = torch.cat(outputs, dim=1).permute(2, 0, 1)  # (T, B, D·C)
        rows = torch.arange(batch, device=x.device)
        h_n = torch.stack([out[rows, :, ends - 1] for out in outputs])  # (D, B, C)
        if lengths is not None:
            running = torch.arange(steps, device=x.device).unsqueeze(1) < ends
            output = output * running.unsqueeze(2)
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, *new_histories)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"kernel_size={self.kernel_size}, receptive_field={self.receptive_field}"
                + (", bidirectional=True" if self.bidirectional else ""))
