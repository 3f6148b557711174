"""Loss curves and per-layer gradient norms of a run, from its ``metrics.jsonl``, as one PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display

import matplotlib.pyplot as plt

from rnnkit.train.atomic import write_bytes
from rnnkit.train.metrics import read_metrics


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean: per-step losses are noisy enough to hide the trend."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(metrics_path: str | Path, png_path: str | Path, title: str | None = None,
             unit: str = "nats per token") -> Path:
    """Loss curves and per-layer gradient norms of a run; ``unit``: the loss's unit as the
    command line prints it (the task's ``loss_unit``: nats/char, nats/word, ...)."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid"]
    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    if train:
        steps = [r["step"] for r in train]
        window = max(1, len(train) // 100)
        ax_loss.plot(steps, _smooth([r["loss"] for r in train], window), label="train", lw=1)
    if valid:
        ax_loss.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-",
                     label="validation", lw=1.5, ms=3)
    ax_loss.set_ylabel(f"loss ({unit})")
    if train or valid:  # a run that diverged at its first step has nothing to label
        ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if title:
        ax_loss.set_title(title)
    if train:
        groups = sorted({g for r in train for g in r.get("grad_norms", {})})
        for group in groups:
            ax_grad.plot(steps, [r["grad_norms"].get(group, float("nan")) for r in train],
                         label=group, lw=0.8)
        ax_grad.set_yscale("log")
        ax_grad.legend(fontsize="small", ncol=2)
    ax_grad.set_ylabel("gradient L2 norm (before clipping)")
    ax_grad.set_xlabel("step")
    ax_grad.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    save_figure(fig, png_path, dpi=100)
    return png_path


def save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (never through a planted symlink)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    path = Path(path)
    write_bytes(path, buffer.getvalue())
    return path
