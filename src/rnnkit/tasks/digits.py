"""Handwritten digits read one image row per time step: the many-to-one baseline.

Data: scikit-learn's bundled 8×8 digits (1,797 images, pixel values 0–16, no download). Each
image becomes a sequence of 8 steps of 8 pixels (``reader = "rows"``, or ``"columns"``), scaled
to [0, 1]; the classifier pools the recurrent outputs and predicts one of ten digits.

Splits are stratified and fixed by ``split_seed``: ``test_fraction`` of the images are held out
for the reported accuracy, ``valid_fraction`` of the rest steer the learning-rate schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.models.classifier import ClassifierConfig, SequenceClassifier, image_rows
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.options import Options, option
from rnnkit.tasks.common import (
    EpochPlan,
    confusion_matrix,
    device_of,
    from_meta,
    load_task_model,
    per_sequence,
    require_full_bptt,
)
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch, StepResult

NAME = "digits"
READERS = ("rows", "columns")
CLASSES = 10


@dataclass
class DigitsDataConfig(Options):
    reader: str = option("rows", "one time step per image row, or per column", choices=READERS)
    test_fraction: float = option(0.2, "fraction of the images kept for the test", gt=0, lt=1)
    valid_fraction: float = option(0.1, "fraction of the rest kept for validation", gt=0, lt=1)
    split_seed: int = option(0, "seed of the split", ge=0)
    eval_batch_size: int = option(512, "images evaluated in parallel", ge=1)


SECTIONS: dict[str, type] = {"data": DigitsDataConfig, "model": ClassifierConfig,
                             "train": TrainConfig}


def default_model() -> ClassifierConfig:
    recurrent = RecurrentConfig(cell="lstm", layers=1, hidden=128, bidirectional=True)
    return ClassifierConfig(classes=CLASSES, embedding=0, input_size=8, pooling="mean",
                            dropout=0.3, recurrent=recurrent)


def default_config() -> dict[str, dict[str, Any]]:
    train = TrainConfig(steps=3000, batch_size=64, lr=3e-3, eval_every=100, clip_norm=5.0,
                        plateau_patience=2)
    return {"data": asdict(DigitsDataConfig()), "model": default_model().to_dict(),
            "train": train.to_dict()}


def load_images() -> tuple[Tensor, Tensor]:
    """All 1,797 images (N, 8, 8) in [0, 1] and their labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def split_indices(labels: Tensor, data: DigitsDataConfig) -> tuple[list[int], list[int], list[int]]:
    """Stratified (train, valid, test) indices, fixed by ``split_seed``."""
    from sklearn.model_selection import train_test_split

    everything = list(range(labels.numel()))
    rest, test = train_test_split(everything, test_size=data.test_fraction,
                                  random_state=data.split_seed, stratify=labels.numpy())
    train, valid = train_test_split(rest, test_size=data.valid_fraction,
                                    random_state=data.split_seed, stratify=labels[rest].numpy())
    return sorted(train), sorted(valid), sorted(test)


def to_sequence(images: Tensor, reader: str) -> Tensor:
    """Images (B, 8, 8) → time-major steps (8, B, 8): rows, or columns (the transposed image)."""
    return image_rows(images if reader == "rows" else images.transpose(1, 2))


class DigitsTask:
    """The Trainer's view of row-by-row digit classification."""

    name = NAME

    def __init__(self, images: Tensor, labels: Tensor, data: DigitsDataConfig,
                 model_config: ClassifierConfig, batch_size: int, seed: int) -> None:
        self.data, self.model_config = data, model_config
        self.images, self.labels = images, labels
        self.train_ids, self.valid_ids, self.test_ids = split_indices(labels, data)
        self.plan = EpochPlan([8] * len(self.train_ids), batch_size, seed)
        self.counts = {"train": len(self.train_ids), "valid": len(self.valid_ids),
                       "test": len(self.test_ids)}

    def num_batches(self) -> int:
        return len(self.plan)

    def batch(self, index: int) -> Batch:
        ids = [self.train_ids[i] for i in self.plan.indices(index)]
        # labels (1, B): see per_sequence() for why they carry a unit time dimension
        return Batch(to_sequence(self.images[ids], self.data.reader), per_sequence(self.labels[ids]))

    def chance_loss(self) -> float:
        """The loss of a uniform guess (the Trainer calls far above it divergence)."""
        return math.log(CLASSES)

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        labels = batch.targets[0]  # (B,)
        loss = F.cross_entropy(model(batch.inputs), labels)
        return StepResult(loss, None, int(labels.numel()))

    def predictions(self, model: nn.Module, split: str = "valid") -> tuple[list[int], list[int], float]:
        """(references, predictions, mean cross-entropy) on ``split`` ("valid" or "test")."""
        ids = self.valid_ids if split == "valid" else self.test_ids
        return predict_images(model, self.images[ids], self.labels[ids], self.data.reader,
                              self.data.eval_batch_size)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        references, predictions, loss = self.predictions(model)
        return {"loss": loss, "accuracy": accuracy(references, predictions)}

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "data": asdict(self.data)}


@torch.no_grad()
def predict_images(model: nn.Module, images: Tensor, labels: Tensor, reader: str, batch_size: int
                   ) -> tuple[list[int], list[int], float]:
    """(references, predictions, mean cross-entropy) of images (N, 8, 8) in [0, 1]."""
    model.eval()
    device = device_of(model)
    references, predictions, total = [], [], 0.0
    for start in range(0, images.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        logits = model(to_sequence(images[chunk], reader).to(device)).cpu()  # (B, 10)
        total += float(F.cross_entropy(logits, labels[chunk], reduction="sum"))
        references += labels[chunk].tolist()
        predictions += logits.argmax(-1).tolist()
    return references, predictions, total / max(1, images.shape[0])


def read_optdigits(path: str | Path) -> tuple[Tensor, Tensor]:
    """Images (N, 8, 8) in [0, 1] and labels (N,) from a file in the UCI optdigits layout
    (``optdigits.tes``; scikit-learn's bundled set is that file): per line 64 comma-separated
    pixel counts 0–16, row by row, then the digit."""
    from rnnkit.data.text import FormatError, missing_data_file

    path = Path(path)
    if not path.is_file():
        raise missing_data_file(path)
    images, labels = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FormatError(path, None, "not a text file of comma-separated pixels") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            values = [int(v) for v in line.split(",")]
        except ValueError:
            raise FormatError(path, number, "expected 65 comma-separated integers (64 pixels "
                              "0-16, then the digit)") from None
        if len(values) != 65 or not all(0 <= v <= 16 for v in values[:64]) or not 0 <= values[64] <= 9:
            raise FormatError(path, number, f"expected 64 pixels in 0-16 and a digit 0-9, got "
                              f"{len(values)} values")
        images.append(values[:64])
        labels.append(values[64])
    if not images:
        raise FormatError(path, None, "no images")
    return torch.tensor(images, dtype=torch.float32).view(-1, 8, 8) / 16.0, torch.tensor(labels)


def accuracy(references: list[int], predictions: list[int]) -> float:
    return sum(r == p for r, p in zip(references, predictions)) / max(1, len(references))


def build(config: dict[str, dict[str, Any]]) -> tuple[DigitsTask, SequenceClassifier, str]:
    """Task and a fresh model from a resolved config (seed the RNGs first)."""
    data = DigitsDataConfig(**config["data"])
    train = TrainConfig.from_dict(config["train"])
    require_full_bptt(train, NAME)
    model_config = ClassifierConfig.from_dict({**config["model"], "classes": CLASSES,
                                               "embedding": 0, "input_size": 8})
    images, labels = load_images()
    task = DigitsTask(images, labels, data, model_config, train.batch_size, train.seed)
    return task, SequenceClassifier(model_config), "scikit-learn's 8×8 digits (1,797 images)"


def load_model(path: str | Path | Checkpoint) -> tuple[SequenceClassifier, DigitsDataConfig, Checkpoint]:
    """The trained classifier and its data options from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: SequenceClassifier(ClassifierConfig.from_dict(m)), required=("data",))
    data = from_meta(checkpoint, "task.data", lambda: DigitsDataConfig(**described["data"]))
    return model, data, checkpoint


@torch.no_grad()
def classify(model: SequenceClassifier, images: Tensor, reader: str = "rows") -> list[int]:
    """Digits of images (B, 8, 8) with pixel values in [0, 1]."""
    model.eval()
    return model(to_sequence(images, reader)).argmax(-1).tolist()


def confusion_on_test(task: DigitsTask, model: nn.Module) -> Tensor:
    references, predictions, _ = task.predictions(model, "test")
    return confusion_matrix(references, predictions, CLASSES)


def describe_data(task: DigitsTask) -> str:
    counts = task.counts
    return (f"{counts['train']} training, {counts['valid']} validation and {counts['test']} "
            "held-out test images")


def report(task: DigitsTask, model: SequenceClassifier, config: dict[str, Any], out: Path) -> None:
    """What a finished run prints: the held-out test accuracy of the weights validation chose
    (also in metrics.jsonl), a few test images read, and the test confusion matrix (PNG)."""
    from rnnkit.tasks.common import chosen_weights, plot_confusion, record_test

    which, step = chosen_weights(model, out)
    references, predictions, loss = task.predictions(model, "test")
    score = accuracy(references, predictions)
    print(f"test ({len(references)} held-out images), {which}: accuracy {100 * score:.2f}%")
    record_test(out, "test", step, {"loss": loss, "accuracy": score})
    shown = ", ".join(f"{r}→{p}" for r, p in list(zip(references, predictions))[:10])
    print(f"first test images, true→read: {shown}")
    counts = confusion_matrix(references, predictions, CLASSES)
    png = plot_confusion(counts, [str(d) for d in range(CLASSES)], out / "confusion.png",
                         f"held-out test: accuracy {100 * score:.1f}%")
    print(f"confusion matrix: {png}")

