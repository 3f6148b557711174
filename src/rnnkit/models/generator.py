"""One-to-many: a generator of binary frames, e.g. 88-key piano rolls (polyphonic music).

    frames (T, B, P) in {0, 1} ─(input linear)─► RNN ─► linear ─► P logits: frame t+1 given frames ≤ t

Each pitch is an independent Bernoulli given the history (the RNN baseline of
Boulanger-Lewandowski et al. 2012). Their reported loss, the negative log-likelihood per time
step, is what :func:`frame_nll` computes::

    NLL = (1 / #steps) Σ_steps Σ_pitches −[y log σ(z) + (1 − y) log(1 − σ(z))]

A sequence of n frames gives n − 1 predictions (frame 1 has no history to be predicted from).
Generation samples frame by frame after a primer; ``temperature`` divides the logits (0: each
pitch on iff its probability exceeds ½).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.models.classifier import valid_mask
from rnnkit.models.recurrent import RecurrentConfig, build_recurrent
from rnnkit.options import Options, option


@dataclass
class GeneratorConfig(Options):
    """Everything needed to rebuild a :class:`FrameGenerator`; JSON-able via ``to_dict``."""

    pitches: int = option(88, "notes per frame (derived from the data)", ge=1)
    dropout: float = option(0.0, "dropout on the inputs and outputs", ge=0, lt=1)
    recurrent: RecurrentConfig = option(help="the recurrent stack",
                                        factory=lambda: RecurrentConfig(layers=1, hidden=128))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recurrent.bidirectional:
            raise ValueError("a generator reads left to right: it cannot be bidirectional")


def frame_nll(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Bernoulli NLL summed over pitches, averaged over valid steps.

    logits, targets (T, B, P); mask (T, B) bool or None (all valid).
    """
    per_pitch = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype),
                                                   reduction="none")  # (T, B, P)
    per_step = per_pitch.sum(2)  # (T, B)
    if mask is None:
        return per_step.mean()
    return (per_step * mask).sum() / mask.sum()


class FrameGenerator(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.rnn = build_recurrent(config.recurrent, config.pitches)
        self.drop = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.recurrent.hidden, config.pitches)

    def forward(self, frames: Tensor, lengths: Tensor | None = None, state: Any = None) -> tuple[Tensor, Any]:
        """frames (T, B, P) → logits (T, B, P) for the *next* frame at each step, final state."""
        x = frames.to(self.output.weight.dtype)
        if lengths is None:
            outputs, state = self.rnn(x, state)  # (T, B, H)
        else:
            outputs, state = self.rnn(x, state, lengths=lengths)
        return self.output(self.drop(outputs)), state

    def loss(self, frames: Tensor, lengths: Tensor | None = None) -> Tensor:
        """NLL per time step of frames[1:] given the frames before; frames (T, B, P), lengths (B,)."""
        if frames.shape[0] < 2:
            raise ValueError("need at least two frames: one to read and one to predict")
        if lengths is None:
            logits, _ = self(frames[:-1])
            return frame_nll(logits, frames[1:])
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        if bool((lengths < 2).any()):
            raise ValueError("every sequence needs at least two frames")
        logits, _ = self(frames[:-1], lengths - 1)  # (T-1, B, P)
        return frame_nll(logits, frames[1:], valid_mask(lengths - 1, frames.shape[0] - 1))

    @torch.no_grad()
    def sample(self, primer: Tensor, steps: int, temperature: float = 1.0,
               seed: int | None = None) -> Tensor:
        """The primer (T0, P) followed by ``steps`` sampled frames: (T0 + steps, P) float 0/1."""
        if primer.dim() != 2 or primer.shape[0] < 1 or primer.shape[1] != self.config.pitches:
            raise ValueError(f"primer must be (T0 ≥ 1, {self.config.pitches}), got {tuple(primer.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {temperature}")
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        frames = [primer.to(self.output.weight.dtype)]
        logits, state = self(frames[0].unsqueeze(1))  # (T0, 1, P)
        for _ in range(steps):
            last = logits[-1, 0]  # (P,)
            if temperature == 0:
                frame = (last > 0).to(last.dtype)
            else:
                frame = torch.bernoulli(torch.sigmoid(last / temperature), generator=generator)
            frames.append(frame.unsqueeze(0))
            logits, state = self(frame.view(1, 1, -1), state=state)  # (1, 1, P)
        return torch.cat(frames)
