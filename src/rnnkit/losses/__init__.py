"""Losses rnnkit computes itself (the others are torch's)."""

from rnnkit.losses.ctc import CTCLoss, ctc_loss

__all__ = ["CTCLoss", "ctc_loss"]
