"""Training: the task-agnostic Trainer, its configuration, checkpoints and metrics."""

from rnnkit.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch, StepResult, Task
from rnnkit.train.trainer import DivergenceError, Trainer, TrainResult, chunk_spans, detach_state

__all__ = [
    "Batch",
    "Checkpoint",
    "CheckpointError",
    "DivergenceError",
    "StepResult",
    "Task",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "chunk_spans",
    "detach_state",
    "load_checkpoint",
    "save_checkpoint",
]
