"""Losses rnnkit computes itself (the others are torch's)."""

from rnnkit.losses.cross_entropy import linear_cross_entropy
from rnnkit.losses.ctc import CTCLoss, ctc_loss

__all__ = ["CTCLoss", "ctc_loss", "linear_cross_entropy"]
