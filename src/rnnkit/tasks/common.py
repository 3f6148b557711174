"""Pieces the example-based tasks share (digits, sentiment, tagging, translate, music).

* :class:`EpochPlan`: which examples form training batch ``index`` — length-bucketed, reshuffled
  every epoch from (seed, epoch) alone, so ``Task.batch(index)`` is a pure function of the index
  and a resumed run sees exactly the batches an uninterrupted one would;
* :func:`load_task_checkpoint`: a checkpoint of the named task, or an error naming what it is;
* :func:`section_fields`, :func:`shared_path`: small conveniences every task module repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from rnnkit.data.text import bucket_batches
from rnnkit.train.checkpoint import Checkpoint, load_checkpoint

SHARED_DATA = Path("../shared/data")  # the shared data sets, relative to the project root


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


def load_task_checkpoint(path: str | Path | Checkpoint, name: str
                         ) -> tuple[Checkpoint, dict[str, Any]]:
    """The checkpoint at ``path`` (or already read) and its task description; refuses another
    task's checkpoint."""
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    described = checkpoint.meta.get("task", {})
    if described.get("name") != name:
        raise ValueError(f"{checkpoint.path} is a {described.get('name')!r} checkpoint, "
                         f"not a {name} one")
    return checkpoint, described


def section_fields(sections: dict[str, type]) -> dict[str, list[str]]:
    """Option names per config section (for the CLI's flags and error messages)."""
    return {name: [f.name for f in fields(cls)] for name, cls in sections.items()}


def shared_path(relative: str, configured: str | None = None) -> Path:
    """``configured`` if given, else ``../shared/data/<relative>``; missing → error naming it."""
    path = Path(configured) if configured else SHARED_DATA / relative
    if not path.exists():
        hint = "" if configured else " (the shared data sets beside the repository); pass a path"
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def per_class_f1(references: Sequence[int], predictions: Sequence[int], classes: int
                 ) -> list[dict[str, float]]:
    """Precision, recall and F1 of each class (0 where undefined, as scikit-learn's default)."""
    counts = confusion_matrix(references, predictions, classes)
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
    model.load_state_dict(chosen.group("model"))
    step = int(chosen.meta["step"])
    return f"the weights of step {step} (best {monitored})", step


def record_test(out: str | Path, split: str, step: int | None, metrics: dict[str, float]) -> None:
    """Appends a ``kind: "test"`` record (held-out scores of the chosen weights) to metrics.jsonl."""
    import json

    path = Path(out) / "metrics.jsonl"
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps({"kind": "test", "split": split, "step": step, **metrics}) + "\n")


def device_of(model: Any) -> Any:
    """Where a model's parameters live: held-out data is moved there before the model reads it."""
    return next(model.parameters()).device


def on_device(values: dict[str, Any], device: Any) -> dict[str, Any]:
    """A dict of model arguments with every tensor moved to ``device`` (None stays None)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in values.items()}
