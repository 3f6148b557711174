"""Checkpoints: tensors in safetensors, everything else in JSON; no pickle, so loading runs no code.

A run directory holds ``checkpoint.json`` (the pointer, written last) and the
``checkpoint-<step>.safetensors`` it names together with that file's SHA-256. The Trainer also
keeps the weights of the lowest validation loss so far as ``best.json`` + ``best-<step>.safetensors``
(model weights and task description only: for inference, not for resuming). Each file is written
atomically, so after a crash at any moment the pointer names a complete, matching weights file:
the last good checkpoint stays intact. A file that does not match is refused, naming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
from torch import Tensor

from rnnkit.train.atomic import write_bytes, write_text

POINTER = "checkpoint.json"
BEST = "best"  # stem of the best-validation checkpoint
FORMAT = "rnnkit-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, truncated or of another format."""


@dataclass
class Checkpoint:
    path: Path  # the pointer JSON
    meta: dict[str, Any]
    tensors: dict[str, Tensor]

    def group(self, prefix: str) -> dict[str, Tensor]:
        """Tensors stored under ``prefix/``, with the prefix removed."""
        start = prefix + "/"
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}


def pointer_path(path: str | Path) -> Path:
    """A run directory or a checkpoint JSON → the checkpoint JSON."""
    path = Path(path)
    return path / POINTER if path.is_dir() else path


def save_checkpoint(run_dir: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any],
                    stem: str = "checkpoint") -> Path:
    """Writes ``<stem>-<step>.safetensors`` then its pointer ``<stem>.json``, each atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights_name = f"{stem}-{int(meta['step']):08d}.safetensors"
    data = safetensors.torch.save({k: v.detach().contiguous() for k, v in tensors.items()})
    write_bytes(run_dir / weights_name, data)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "weights": weights_name,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "weights_bytes": len(data),
        **meta,
    }
    pointer = run_dir / f"{stem}.json"
    write_text(pointer, json.dumps(record, indent=1) + "\n")
    # only now is the older weights file unreferenced
    for old in run_dir.glob(f"{stem}-*.safetensors"):
        if old.name != weights_name:
            old.unlink()
    return pointer


def load_checkpoint(path: str | Path) -> Checkpoint:
    pointer = pointer_path(path)
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint at {pointer}")
    try:
        meta = json.loads(pointer.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint {pointer} is corrupt or truncated (not valid JSON: {error})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{pointer} is not an rnnkit checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {pointer} has format version {meta.get('version')}, "
                              f"this rnnkit reads version {VERSION}")
    weights = pointer.parent / str(meta.get("weights"))
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} (named by {pointer}) are missing")
    data = weights.read_bytes()
    if len(data) != meta.get("weights_bytes"):
        raise CheckpointError(
            f"checkpoint weights {weights} are truncated or corrupt: {len(data)} bytes, "
            f"{meta.get('weights_bytes')} expected"
        )
    if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
        raise CheckpointError(f"checkpoint weights {weights} are corrupt: SHA-256 does not match "
                              f"the one recorded in {pointer}")
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as error:
        raise CheckpointError(f"checkpoint weights {weights} cannot be read: {error}") from None
    return Checkpoint(pointer, meta, tensors)
