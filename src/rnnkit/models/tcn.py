"""Temporal convolutional network (Bai, Kolter & Koltun 2018): the convolutional sequence model.

A stack of residual blocks; block ``i`` holds two causal 1-D convolutions of kernel size k and
dilation ``2^i`` with weight normalisation, ReLU and dropout, and adds its input back (through a
1×1 convolution where the widths differ)::

    y = ReLU(x + dropout(ReLU(WN-conv_d(dropout(ReLU(WN-conv_d(x)))))))

"Causal" means the output at step t reads inputs t − R + 1 … t only, where the receptive field is
``R = 1 + 2 (k − 1) (2^L − 1)`` for L blocks; padding is on the left.

:class:`TCN` has the call of rnnkit's recurrent layers — ``output, state = tcn(x, state,
lengths=...)`` on (T, B, I) — so every task can use it (``cell: tcn``). Its *state* is
``(h_n, context)``: ``h_n`` (D, B, C) is the output at each sequence's last step (what a classifier
pools as "final"), and ``context`` (B, R − 1, I) the last R − 1 inputs. Passing the state of one
call to the next makes a long stream cut into windows — truncated BPTT, or generation one step at
a time — give exactly the outputs of one call on the whole stream: a convolution needs no more
memory of the past than its receptive field. Zero context is the zero left padding of a fresh
sequence. ``bidirectional=True`` adds a second TCN reading each sequence backwards (within its
length); it is for tagging and classification, where the whole input is known, not for streams.
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


class CausalConv(nn.Module):
    """A weight-normalised dilated 1-D convolution padded on the left only: (B, C, T) → (B, C', T)."""

    def __init__(self, channels_in: int, channels_out: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        conv = nn.Conv1d(channels_in, channels_out, kernel_size, dilation=dilation)
        nn.init.normal_(conv.weight, 0.0, 0.01)  # Bai et al.'s initialisation
        self.conv = weight_norm(conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.left_pad, 0)))


class TemporalBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, kernel_size: int, dilation: int,
                 dropout: float) -> None:
        super().__init__()
        self.conv1 = CausalConv(channels_in, channels_out, kernel_size, dilation)
        self.conv2 = CausalConv(channels_out, channels_out, kernel_size, dilation)
        self.dropout = nn.Dropout(dropout)
        self.downsample = nn.Conv1d(channels_in, channels_out, 1) if channels_in != channels_out else None

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) → (B, C_out, T)
        y = self.dropout(F.relu(self.conv1(x)))
        y = self.dropout(F.relu(self.conv2(y)))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(y + residual)


class CausalStack(nn.Module):
    """One direction: ``levels`` temporal blocks with dilations 1, 2, 4, …"""

    def __init__(self, input_size: int, channels: int, levels: int, kernel_size: int,
                 dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TemporalBlock(input_size if i == 0 else channels, channels, kernel_size, 2**i, dropout)
            for i in range(levels)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, I, T) → (B, C, T)
        for block in self.blocks:
            x = block(x)
        return x


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
        self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None,
        lengths: Sequence[int] | Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``output (T, B, D·C), (h_n (D, B, C), context (B, R − 1, I))`` for x (T, B, I)."""
        check_sequence("input", x, self.input_size, self.directions[0].blocks[0].conv1.conv.bias.dtype)
        if x.dim() != 3:
            raise ValueError(f"TCN input must be 3-D, got shape {tuple(x.shape)}")
        if self.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        if lengths is not None:
            lengths = check_lengths(lengths, batch, steps, x.device)
        past = self.receptive_field - 1
        if hx is None:
            context = x.new_zeros(batch, past, self.input_size)
        else:
            context = hx[1]
            if self.bidirectional:
                raise ValueError("a bidirectional TCN reads whole sequences: it takes no state")
            if tuple(context.shape) != (batch, past, self.input_size):
                raise ValueError(f"TCN context must have shape {(batch, past, self.input_size)}, "
                                 f"got {tuple(context.shape)}")
        full = torch.cat((context, x.transpose(0, 1)), dim=1)  # (B, R − 1 + T, I)
        outputs = [self.directions[0](full.transpose(1, 2))[:, :, past:]]  # (B, C, T)
        if self.bidirectional:
            backwards = reverse_within_lengths(x, lengths).permute(1, 2, 0)  # (B, I, T)
            backwards = F.pad(backwards, (past, 0))
            out = self.directions[1](backwards)[:, :, past:].permute(2, 0, 1)  # (T, B, C)
            outputs.append(reverse_within_lengths(out, lengths).permute(1, 2, 0))
        output = torch.cat(outputs, dim=1).permute(2, 0, 1)  # (T, B, D·C)
        last = (lengths.to(x.device) - 1) if lengths is not None else torch.full(
            (batch,), steps - 1, device=x.device)
        rows = torch.arange(batch, device=x.device)
        h_n = torch.stack([out[rows, :, last] for out in outputs])  # (D, B, C)
        if lengths is not None:
            running = torch.arange(steps, device=x.device).unsqueeze(1) < lengths.to(x.device)
            output = output * running.unsqueeze(2)
        # the inputs each row's next window needs: the R − 1 before its own end
        window = last.unsqueeze(1) + 1 + torch.arange(past, device=x.device)  # (B, R − 1) in full
        next_context = full.gather(1, window.unsqueeze(2).expand(batch, past, self.input_size))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, next_context)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"kernel_size={self.kernel_size}, receptive_field={self.receptive_field}"
                + (", bidirectional=True" if self.bidirectional else ""))
