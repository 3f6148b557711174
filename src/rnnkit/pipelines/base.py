"""The one type every trained run loads as: ``Pipeline`` (``.predict`` / ``.evaluate``).

A pipeline wraps the trained module with everything needed to read what a person has (text, a
WAV file, an image, a MIDI primer) the way training read its data, and to answer in plain named
results (label names, tagged entities, translations with their score, generated text or MIDI).
``evaluate`` scores a file or folder in the task's data format with the very functions the
task's validation uses, so the same data gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from rnnkit.train.checkpoint import BEST, POINTER, Checkpoint, CheckpointError, load_checkpoint


class InputError(ValueError):
    """An input in a form the pipeline cannot read; the message names the input."""


def shown(value: Any, limit: int = 60) -> str:
    """A short printable form of an input for error messages."""
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Result:
    """A prediction: plain named fields; ``to_dict()`` is JSON-able, ``str()`` is for people."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if not f.name.startswith("_")}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return _plain(asdict(value))
    return value


class Pipeline:
    """A trained model of one task, ready to predict and evaluate.

    Attributes: ``task`` (its name), ``config`` (the run's options: its ``config.yaml`` when
    present, else what the checkpoint records), ``module`` (the ``nn.Module``, in eval mode on
    ``device``) and ``checkpoint`` (the weights' file and metadata).
    """

    task: ClassVar[str]
    # the keyword options predict() takes, with their defaults
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu") -> None:
        self.checkpoint = checkpoint
        self.described: dict[str, Any] = checkpoint.meta["task"]
        self.device = torch.device(device)
        self.config = run_config(checkpoint)
        try:
            self.module: nn.Module = self._load()
        except CheckpointError:  # the task's validated loading already named file and field
            raise
        except (RuntimeError, KeyError, TypeError, ValueError) as error:
            # a checkpoint whose description and weights disagree (edited JSON, other version)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{checkpoint.path} does not describe a loadable {self.task} "
                                  f"model: {first}") from None
        self.module.to(self.device).eval()

    def _load(self) -> nn.Module:
        """Builds the module (and the task's readers) from ``self.checkpoint``."""
        raise NotImplementedError

    # --- prediction ------------------------------------------------------------------------

    def predict(self, inputs: Any, batch_size: int = 32, **options: Any) -> Any:
        """The result for one input, or a list of results for a list of inputs (batched)."""
        single = self._is_single(inputs)
        results = [r for batch in self.iter_predict([inputs] if single else list(inputs),
                                                    batch_size, **options) for r in batch]
        return results[0] if single else results

    def __call__(self, inputs: Any, batch_size: int = 32, **options: Any) -> Any:
        """``pipe(inputs)`` is ``pipe.predict(inputs)``, as Hugging Face pipelines are called."""
        return self.predict(inputs, batch_size, **options)

    def iter_predict(self, inputs: Sequence[Any], batch_size: int = 32, **options: Any
                     ) -> Iterator[list[Result]]:
        """The results of ``inputs``, one list per batch of ``batch_size``, as they are made."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "no options"
            raise ValueError(f"the {self.task} pipeline has no option {', '.join(unknown)} "
                             f"(it takes {takes})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        settings = {**self.options, **options}
        for start in range(0, len(inputs), batch_size):
            with torch.no_grad():  # left before yielding: the caller's code keeps its grad mode
                results = self._predict(list(inputs[start:start + batch_size]), start,
                                        len(inputs), **settings)
            yield results

    def _is_single(self, inputs: Any) -> bool:
        return not isinstance(inputs, (list, tuple))

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        """Results of ``batch``, inputs ``first_index`` + 1 … of ``total`` (for messages)."""
        raise NotImplementedError

    def parse(self, line: str) -> Any:
        """A command-line input (an argument or a line of a file) as a ``predict`` input."""
        return line

    # --- evaluation ------------------------------------------------------------------------

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """The validation metrics of the data at ``path`` (a file or folder in the task's format)."""
        raise NotImplementedError

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.task} from {self.checkpoint.path}>"


def resolve(path: str | Path) -> Path:
    """A run directory (its best weights, else its last checkpoint) or a checkpoint JSON."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    if path.is_dir():
        for name in (f"{BEST}.json", POINTER):
            if (path / name).is_file():
                if not (path / name).resolve().is_relative_to(path.resolve()):
                    # as load_checkpoint does for a directory: only files inside it are read
                    raise CheckpointError(f"{path / name} is a link leading outside {path}; "
                                          "refusing to read it")
                return path / name
        raise CheckpointError(f"{path} holds no {BEST}.json or {POINTER}: not a run directory")
    return path


def run_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The run's resolved options: config.yaml beside the checkpoint, else what it records."""
    saved = checkpoint.path.parent / "config.yaml"
    if saved.is_file():
        try:
            data = yaml.safe_load(saved.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and data.get("task") == checkpoint.meta["task"].get("name"):
            return data
    described = checkpoint.meta["task"]
    return {"task": described.get("name"), "data": described.get("data", {}),
            "model": described.get("model", {}), "train": checkpoint.meta.get("train_config", {})}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint of a run (:func:`resolve`), its structure checked by :func:`load_checkpoint`
    (``task`` an object with a name); the task's loader (``load_task_model``) checks the rest
    (``task.model`` and the sections it needs, the tensors against the model), naming the field."""
    return load_checkpoint(resolve(path))

