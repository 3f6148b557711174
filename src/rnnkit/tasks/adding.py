"""The adding problem (Hochreiter & Schmidhuber 1997; Bai et al. 2018's setting): many-to-one.

Each input step has two channels: a value drawn uniformly from [0, 1], and a marker that is 1 at
exactly two steps (one in each half of the sequence) and 0 elsewhere. The target is the sum of the
two marked values; the loss is the mean squared error. Predicting the mean (1.0) scores ≈ 0.167,
so anything clearly below that has learnt to remember; Bai et al. report MSE 5.8e-5 (TCN) and
5.3e-5 (GRU) at T = 600 and 0.164 for the LSTM.

A recipe that solves T = 600 in minutes on one CPU thread (docs/results.md, issue 13): one layer
of 64 minGRU units with the chrono gate biases (``--chrono`` T_max = T; Tallec & Ollivier 2018)::

    rnnkit train adding --cell mingru --layers 1 --hidden 64 --chrono 600 --lr 1e-2 \
        --schedule budget --budget-hold 0.5 --budget-final 0.01 --minutes 10

minGRU's update gate reads x_t alone, so it can open exactly at the markers; the chrono biases
make every unit keep h for 2–600 steps from the start, so the loss's gradient reaches the
markers at once (with torch's uniform initialisation the same model sits at the mean-predictor's
MSE for thousands of steps).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.models.classifier import ClassifierConfig, SequenceClassifier
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.tasks.common import from_meta, load_task_model, per_sequence, require_full_bptt
from rnnkit.tasks.synthetic import SyntheticDataConfig, SyntheticTask
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch

NAME = "adding"
SECTIONS: dict[str, type] = {"data": SyntheticDataConfig, "model": ClassifierConfig, "train": TrainConfig}


def default_config() -> dict[str, dict[str, Any]]:
    model = ClassifierConfig(classes=1, embedding=0, input_size=2, pooling="final",
                             recurrent=RecurrentConfig(cell="gru", layers=1, hidden=77))
    train = TrainConfig(steps=20_000, batch_size=32, lr=2e-3, eval_every=200, clip_norm=1.0,
                        plateau_patience=3)
    return {"data": asdict(SyntheticDataConfig(length=600)), "model": model.to_dict(),
            "train": train.to_dict()}


def generate(batch_size: int, length: int, generator: torch.Generator) -> Batch:
    """Inputs (T, B, 2) and targets (1, B): the sum of the two marked values."""
    values = torch.rand(length, batch_size, generator=generator)
    half = length // 2
    first = torch.randint(0, max(1, half), (batch_size,), generator=generator)
    second = torch.randint(half, length, (batch_size,), generator=generator)
    markers = torch.zeros(length, batch_size)
    rows = torch.arange(batch_size)
    markers[first, rows] = 1.0
    markers[second, rows] = 1.0
    target = values[first, rows] + values[second, rows]
    return Batch(torch.stack((values, markers), dim=2), per_sequence(target))


def mse(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
    prediction = model(batch.inputs).squeeze(1)  # (B,)
    target = batch.targets[0]
    return F.mse_loss(prediction, target), int(target.numel())


def build(config: dict[str, dict[str, Any]]) -> tuple[SyntheticTask, SequenceClassifier, str]:
    data = SyntheticDataConfig.from_dict(config["data"])
    train = TrainConfig.from_dict(config["train"])
    require_full_bptt(train, NAME)
    model_config = ClassifierConfig.from_dict({**config["model"], "classes": 1, "embedding": 0,
                                               "input_size": 2})
    task = SyntheticTask(NAME, data, model_config, generate, mse, train.batch_size, train.seed)
    return task, SequenceClassifier(model_config), f"generated adding problem, T = {data.length}"


def load_model(path: str | Path) -> tuple[SequenceClassifier, SyntheticDataConfig, Checkpoint]:
    """The trained model and its data options from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: SequenceClassifier(ClassifierConfig.from_dict(m)), required=("data",))
    data = from_meta(checkpoint, "task.data", lambda: SyntheticDataConfig.from_dict(described["data"]))
    return model, data, checkpoint
