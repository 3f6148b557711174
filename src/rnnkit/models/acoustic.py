"""An acoustic model for CTC: feature frames → (stacked frames) → recurrent encoder → label scores.

Shapes: features (T, B, F) with lengths (B,) → log-probabilities (T', B, C) with lengths (B,),
where T' = ⌈T / stack⌉: stacking ``stack`` neighbouring frames into one shortens the sequence the
recurrence runs over (and CTC aligns) without dropping information.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnkit.models.recurrent import RecurrentConfig, build_recurrent
from rnnkit.options import Options, option


@dataclass
class AcousticConfig(Options):
    features: int = option(40, "feature size per frame (derived from data.features)", ge=1)
    classes: int = option(11, "output classes, including the CTC blank", ge=2)
    stack: int = option(3, "frames stacked (and the frame rate divided) before the RNN", ge=1)
    recurrent: RecurrentConfig = option(
        help="the recurrent stack",
        factory=lambda: RecurrentConfig(layers=2, hidden=128, bidirectional=True))


def stack_frames(features: Tensor, lengths: Tensor, stack: int) -> tuple[Tensor, Tensor]:
    """(T, B, F) → (⌈T/stack⌉, B, stack·F), zero-padding the tail; lengths shrink alike."""
    if stack == 1:
        return features, lengths
    steps, batch, dim = features.shape
    padded_steps = -(-steps // stack) * stack
    if padded_steps != steps:
        features = torch.cat((features, features.new_zeros(padded_steps - steps, batch, dim)))
    stacked = features.view(padded_steps // stack, stack, batch, dim).permute(0, 2, 1, 3)
    return stacked.reshape(padded_steps // stack, batch, stack * dim), -(-lengths // stack)


class AcousticModel(nn.Module):
    def __init__(self, config: AcousticConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_recurrent(config.recurrent, config.features * config.stack)
        self.output = nn.Linear(config.recurrent.output_size, config.classes)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probabilities (T', B, C) over labels (blank = 0) and their lengths (B,)."""
        stacked, lengths = stack_frames(features, lengths, self.config.stack)
        encoded, _ = self.encoder(stacked, lengths=lengths)
        return self.output(encoded).log_softmax(-1), lengths
