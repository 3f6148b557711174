"""``rnnkit.load(path)``: any trained run as a :class:`Pipeline` — predict and evaluate.

    >>> pipe = rnnkit.load("runs/sentiment-…")            # a run directory, best.json or a checkpoint
    >>> pipe.predict("I loved it!")
    Classification(text='I loved it!', label='positive', probability=0.93, ...)
    >>> pipe.evaluate("../shared/data/sst2/dev.tsv")       # the metrics validation prints
    {'loss': 0.41, 'accuracy': 0.83, ...}

One module per task holds its pipeline (inputs, results, evaluation data); see docs/pipelines.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from rnnkit.pipelines.base import InputError, Pipeline, Result, read_checkpoint
from rnnkit.train.checkpoint import CheckpointError

# task name → module:class of its pipeline
PIPELINES = {
    "charlm": "charlm:CharLMPipeline",
    "wordlm": "wordlm:WordLMPipeline",
    "speech": "speech:SpeechPipeline",
    "digits": "digits:DigitsPipeline",
    "sentiment": "sentiment:SentimentPipeline",
    "tagging": "tagging:TaggingPipeline",
    "translate": "translate:TranslatePipeline",
    "music": "music:MusicPipeline",
    "trees": "trees:TreesPipeline",
}


def pipeline_class(task: str) -> type[Pipeline]:
    module, name = PIPELINES[task].split(":")
    return getattr(importlib.import_module(f"rnnkit.pipelines.{module}"), name)


def load(path: str | Path, device: str | torch.device = "cpu", task: str | None = None
         ) -> Pipeline:
    """The trained model at ``path`` — a run directory (its best weights, else its last
    checkpoint), its ``best.json`` or a checkpoint JSON — as the pipeline of its task. With
    ``task``, a run of another task is refused naming both."""
    checkpoint = read_checkpoint(path)
    name = checkpoint.meta["task"].get("name")
    if name not in PIPELINES:
        raise CheckpointError(f"{checkpoint.path} is a checkpoint of {name!r}, which has no "
                              f"pipeline (tasks: {', '.join(PIPELINES)})")
    if task is not None and name != task:
        raise ValueError(f"{path} is a {name!r} run, not a {task} one")
    return pipeline_class(name)(checkpoint, device)


__all__ = ["PIPELINES", "InputError", "Pipeline", "Result", "load", "pipeline_class"]
