"""Pieces the example-based tasks share (digits, sentiment, tagging, translate, music).

* :class:`EpochPlan`: which examples form training batch ``index`` — length-bucketed, reshuffled
  every epoch from (seed, epoch) alone, so ``Task.batch(index)`` is a pure function of the index
  and a resumed run sees exactly the batches an uninterrupted one would;
* :func:`load_task_checkpoint`, :func:`load_task_model`, :func:`from_meta`, :func:`check_size`: a
  checkpoint of the named task, its metadata validated (the SHA-256 covers only the weights, so
  a hand-edited ``checkpoint.json`` must give one clear error, never a KeyError deep inside);
* :func:`shared_path`: the shared data location every task module uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from rnnkit.data.text import bucket_batches
from rnnkit.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_tensors,
    load_checkpoint,
    load_weights,
)

DATA_ENV = "RNNKIT_DATA"  # where the shared data sets are, when not ../shared/data


def shared_root() -> Path:
    """The default data location, the one place it is decided: ``$RNNKIT_DATA``, else
    ``../shared/data`` relative to the directory the command runs in (the shared data sets
    beside a clone of the repository)."""
    return Path(os.environ.get(DATA_ENV) or "../shared/data")


class EpochPlan:
    """Length-bucketed batches of example indices, a fresh order each epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        if not lengths:
            raise ValueError("no training examples")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self._epoch, self._batches = -1, [[0]]
        # bucket cuts depend only on the counts, so every epoch has the same number of batches
        self.size = len(bucket_batches(self.lengths, batch_size, seed=seed))

    def __len__(self) -> int:
        return self.size

    def indices(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.size)
        if epoch != self._epoch:  # one epoch's plan is cached: consecutive indices reuse it
            self._batches = bucket_batches(self.lengths, self.batch_size,
                                           seed=self.seed * 100_003 + epoch)
            self._epoch = epoch
        return self._batches[position]


def load_task_checkpoint(path: str | Path | Checkpoint, name: str, required: Sequence[str] = ()
                         ) -> tuple[Checkpoint, dict[str, Any]]:
    """The checkpoint at ``path`` (or one already read, whose metadata :func:`load_checkpoint`
    checked) and its task description; refuses another task's checkpoint and one whose ``task``
    lacks a ``required`` section (each must be a JSON object)."""
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    described = checkpoint.meta["task"]  # load_checkpoint checked: an object with a name
    if described["name"] != name:
        raise ValueError(f"{checkpoint.path} is a {described['name']!r} checkpoint, "
                         f"not a {name} one")
    for key in required:
        if key not in described:
            raise CheckpointError(f"{checkpoint.path}: task.{key} is missing")
        value = described[key]
        if not isinstance(value, dict):
            kind = "null" if value is None else type(value).__name__
            raise CheckpointError(f"{checkpoint.path}: task.{key} must be a JSON object, got {kind}")
    return checkpoint, described


T = TypeVar("T")
# what a constructor fed hand-edited JSON raises: wrong types, missing keys, bad values
_META_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
                AssertionError, RuntimeError)


def from_meta(checkpoint: Checkpoint, what: str, build: Callable[[], T]) -> T:
    """``build()`` (a config, vocabulary or model from checkpoint metadata); any error it
    raises becomes one CheckpointError naming the file and the field ``what``."""
    try:
        return build()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{checkpoint.path}: {what} is nested too deeply") from None
    except _META_ERRORS as error:
        reason = f"missing key {error}" if isinstance(error, KeyError) else str(error) or type(
            error).__name__
        raise CheckpointError(f"{checkpoint.path}: {what} is invalid: {reason}") from None


def check_size(checkpoint: Checkpoint, what: str, actual: int, option: str, expected: int) -> None:
    """A vocabulary (or label list) must have exactly the entries the model's output has: a
    shortened one would map ids past its end (IndexError) or to the wrong symbols."""
    if actual != expected:
        raise CheckpointError(f"{checkpoint.path}: {what} has {actual} entries but task.model."
                              f"{option} is {expected}")


def load_task_model(path: str | Path | Checkpoint, name: str,
                    build_model: Callable[[dict[str, Any]], nn.Module],
                    required: Sequence[str] = ()) -> tuple[Any, Checkpoint, dict[str, Any]]:
    """The model of a ``name`` checkpoint, built from ``task.model`` by ``build_model`` and
    loaded with the checkpoint's weights (in eval mode), plus the checkpoint and its task
    description; any mismatch between metadata and tensors is one CheckpointError.

    The model is first built on the ``meta`` device, so edited sizes (``hidden: 10**9``) are
    compared with the stored tensors before any memory is allocated for them."""
    checkpoint, described = load_task_checkpoint(path, name, ("model", *required))
    try:
        with torch.device("meta"):
            shapes = build_model(described["model"])
    except Exception:  # the real build below reports what is wrong, naming the field
        shapes = None
    if shapes is not None:
        check_tensors(checkpoint, shapes.state_dict())
    model = from_meta(checkpoint, "task.model", lambda: build_model(described["model"]))
    load_weights(checkpoint, model)
    model.eval()
    return model, checkpoint, described


def shared_path(relative: str, configured: str | None = None) -> Path:
    """``configured`` if given, else ``../shared/data/<relative>``; missing → error naming it."""
    path = Path(configured) if configured else shared_root() / relative
    if not path.exists():
        hint = "" if configured else (f" (the default data location; set {DATA_ENV} or pass "
                                      "--data)")
        raise FileNotFoundError(f"{path} does not exist{hint}")
    return path


def confusion_matrix(references: Sequence[int], predictions: Sequence[int], classes: int) -> Any:
    """(classes, classes) int64 counts, rows the reference class, columns the prediction."""
    import torch

    counts = torch.zeros(classes, classes, dtype=torch.long)
    for ref, hyp in zip(references, predictions):
        counts[ref, hyp] += 1
    return counts


def plot_confusion(counts: Any, labels: Sequence[str], path: str | Path, title: str) -> Path:
    """A confusion-matrix heat map with the counts written in (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * size, 1.0 + 0.45 * size))
    image = ax.imshow(counts.numpy(), cmap="Blues")
    ax.set_xticks(range(size), labels, rotation=90 if max(map(len, labels)) > 3 else 0)
    ax.set_yticks(range(size), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(1, int(counts.max()))
    for i in range(size):
        for j in range(size):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if counts[i, j] > top / 2 else "black")
    ax.set_title(title)
    fig.colorbar(image)
    fig.tight_layout()
    path = Path(path)
    from rnnkit.viz.curves import save_figure  # atomic, never through a symlink

    save_figure(fig, path, dpi=120)
    return path


def per_class_f1(references: Sequence[int], predictions: Sequence[int], classes: int
                 ) -> list[dict[str, float]]:
    """Precision, recall and F1 of each class (0 where undefined, as scikit-learn's default)."""
    return f1_from_counts(confusion_matrix(references, predictions, classes))


def f1_from_counts(counts: Any) -> list[dict[str, float]]:
    """:func:`per_class_f1` from a confusion matrix (rows reference, columns prediction), e.g.
    the sum of the ranks' matrices in a distributed validation."""
    classes = int(counts.shape[0])
    out = []
    for c in range(classes):
        tp = int(counts[c, c])
        predicted, actual = int(counts[:, c].sum()), int(counts[c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"precision": precision, "recall": recall, "f1": f1, "support": float(actual)})
    return out


def per_sequence(values: Any) -> Any:
    """Per-sequence values (B, ...) as (1, B, ...).

    The Trainer calls ``Batch.time_slice(0, T)`` on every batch, which slices *every* tensor of
    the batch on dim 0; a unit leading dimension keeps labels and lengths whole under that cut
    (a (B,) tensor would be truncated to its first T entries when B > T).
    """
    return values.unsqueeze(0)


def require_full_bptt(train: Any, name: str) -> None:
    """Example tasks see each sequence whole: truncated BPTT would cut labels and lengths."""
    if train.bptt is not None:
        raise ValueError(f"the {name} task trains on whole sequences: leave bptt unset (null)")


def chosen_weights(model: Any, out: str | Path, monitored: str = "validation"
                   ) -> tuple[str, int | None]:
    """Loads the weights validation chose (``best.json``) into ``model`` when the run kept
    them; returns which weights these are, in words, and their step (None: the last ones)."""
    from rnnkit.train.checkpoint import BEST

    best = Path(out) / f"{BEST}.json"
    if not best.is_file():
        return "the last weights", None
    chosen = load_checkpoint(best)
    load_weights(chosen, model)  # names and shapes checked: one CheckpointError, never a traceback
    step = int(chosen.meta["step"])
    return f"the weights of step {step} (best {monitored})", step


def record_test(out: str | Path, split: str, step: int | None, metrics: dict[str, float]) -> None:
    """Appends a ``kind: "test"`` record (held-out scores of the chosen weights) to metrics.jsonl."""
    import json
    import os

    from rnnkit.train.atomic import open_append

    fd = open_append(Path(out) / "metrics.jsonl", fresh=False)  # never through a symlink
    with os.fdopen(fd, "a", encoding="utf-8") as log:
        log.write(json.dumps({"kind": "test", "split": split, "step": step, **metrics}) + "\n")


def device_of(model: Any) -> Any:
    """Where a model's parameters live: held-out data is moved there before the model reads it."""
    return next(model.parameters()).device


def on_device(values: dict[str, Any], device: Any) -> dict[str, Any]:
    """A dict of model arguments with every tensor moved to ``device`` (None stays None)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in values.items()}
