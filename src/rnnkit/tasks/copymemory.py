"""The copy memory problem (Arjovsky et al. 2016; Bai et al. 2018's setting): many-to-many.

The input is 10 digits drawn from 1–8, then T − 1 blanks (0), a delimiter (9) and 10 more blanks:
T + 20 steps. The target is blank everywhere except the last 10 steps, which repeat the 10 digits:
the model must hold them for T steps. The loss is the cross-entropy averaged over all T + 20 steps,
so a model that outputs blanks and then guesses uniformly scores 10·ln 8 / (T + 20) — 0.0204 at
T = 1000, exactly where Bai et al.'s LSTM (0.0204), GRU (0.0197) and RNN (0.0202) stay; their TCN
reaches 3.5e-5.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rnnkit.losses.cross_entropy import linear_cross_entropy
from rnnkit.models.language_model import LanguageModel, LMConfig
from rnnkit.tasks.common import from_meta, load_task_model, require_full_bptt
from rnnkit.tasks.synthetic import SyntheticDataConfig, SyntheticTask
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch

NAME = "copymemory"
DIGITS, BLANK, DELIMITER, SYMBOLS = 10, 0, 9, 10
SECTIONS: dict[str, type] = {"data": SyntheticDataConfig, "model": LMConfig, "train": TrainConfig}


def default_config() -> dict[str, dict[str, Any]]:
    model = asdict(LMConfig(cell="gru", layers=1, hidden=40, embedding=0))
    del model["vocab_size"]
    train = TrainConfig(steps=20_000, batch_size=32, lr=5e-4, eval_every=200, clip_norm=1.0,
                        plateau_patience=3)
    return {"data": asdict(SyntheticDataConfig(length=1000)), "model": model,
            "train": train.to_dict()}


def memoryless_loss(length: int) -> float:
    """The loss of blanks then uniform guesses over 1–8: what a model without memory reaches."""
    return DIGITS * math.log(8) / (length + 2 * DIGITS)


def generate(batch_size: int, length: int, generator: torch.Generator) -> Batch:
    """Inputs and targets, both (T + 20, B) symbols."""
    digits = torch.randint(1, 9, (DIGITS, batch_size), generator=generator)
    inputs = torch.full((length + 2 * DIGITS, batch_size), BLANK, dtype=torch.long)
    inputs[:DIGITS] = digits
    inputs[length + DIGITS - 1] = DELIMITER
    targets = torch.full_like(inputs, BLANK)
    targets[-DIGITS:] = digits
    return Batch(inputs, targets)


def cross_entropy(model: LanguageModel, batch: Batch) -> tuple[Tensor, int]:
    """The mean over all T + 20 steps and the batch: F.cross_entropy of the model's logits,
    computed by linear_cross_entropy (10 classes at 32 × 1,020 positions: class-major is ~10×
    faster than torch's row-major log-softmax and weight gradient, the same loss)."""
    features, _ = model.features(batch.inputs)  # (T, B, H)
    loss = linear_cross_entropy(features.flatten(0, 1), model.decoder.weight, model.decoder.bias,
                                batch.targets.flatten())
    return loss, int(batch.targets.numel())


def build(config: dict[str, dict[str, Any]]) -> tuple[SyntheticTask, LanguageModel, str]:
    data = SyntheticDataConfig.from_dict(config["data"])
    train = TrainConfig.from_dict(config["train"])
    require_full_bptt(train, NAME)
    model_config = LMConfig.from_dict({**config["model"], "vocab_size": SYMBOLS})
    task = SyntheticTask(NAME, data, model_config, generate, cross_entropy, train.batch_size, train.seed)
    return task, LanguageModel(model_config), (
        f"generated copy memory problem, T = {data.length} (memoryless loss "
        f"{memoryless_loss(data.length):.4f})")


def load_model(path: str | Path) -> tuple[LanguageModel, SyntheticDataConfig, Checkpoint]:
    """The trained model and its data options from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: LanguageModel(LMConfig.from_dict(m)), required=("data",))
    data = from_meta(checkpoint, "task.data", lambda: SyntheticDataConfig.from_dict(described["data"]))
    return model, data, checkpoint
