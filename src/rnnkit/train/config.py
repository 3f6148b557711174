"""Training options shared by every task; read from flags, YAML/TOML files and checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "plateau", "step")
MONITOR_MODES = ("min", "max")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer updates (one per BPTT chunk)
    minutes: float | None = None  # wall-clock budget; stops cleanly at a step boundary
    batch_size: int = 32
    bptt: int | None = None  # truncation length k; None: full BPTT over each batch
    optimizer: str = "adam"
    lr: float = 2e-3
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    clip_norm: float | None = 5.0  # global L2 norm bound
    clip_value: float | None = None  # element-wise bound ±c, applied before the norm bound
    schedule: str = "plateau"  # ReduceLROnPlateau on the validation loss, or "step" (below)
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    # "step": the rate is multiplied by decay_factor at every evaluation after the first
    # decay_after ones, whatever the validation loss does (Zaremba et al. 2014's schedule)
    decay_factor: float = 0.5
    decay_after: int = 4
    early_stop: int | None = None  # evaluations without improvement before stopping
    # the validation metric that picks the best weights and drives early stopping and the
    # plateau schedule; "min": lower is better (a loss), "max": higher is (accuracy, F1, BLEU)
    monitor: str = "loss"
    monitor_mode: str = "min"
    eval_every: int = 100
    checkpoint_every: int | None = None  # default: at each evaluation
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.monitor_mode not in MONITOR_MODES:
            raise ValueError(f"monitor_mode must be min or max, got {self.monitor_mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"decay_factor must be in (0, 1], got {self.decay_factor}")
        if self.decay_after < 0:
            raise ValueError(f"decay_after must be non-negative, got {self.decay_after}")
        if self.bptt is not None and self.bptt <= 0:
            raise ValueError(f"bptt must be positive (or null for full BPTT), got {self.bptt}")
        for name in ("clip_norm", "clip_value"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (or null to disable), got {value}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
