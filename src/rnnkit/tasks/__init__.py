"""The applications rnnkit trains, one module each, all with the same interface.

A task module has ``NAME``, ``default_config()`` (sections ``data``, ``model``, ``train``, …),
``build(config) -> (task, model, source_description)`` and ``load_model(path)``; optionally
``report(task, model, config, out)`` for what to print after training (test scores with the chosen
weights, examples, a confusion matrix). Its validation scores are module functions over given data,
so :mod:`rnnkit.pipelines` (``rnnkit.load``) evaluates any file with the same code.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

TASKS = {
    "charlm": "character-level language model (default data: the Python standard library)",
    "wordlm": "word-level language model (Penn Treebank)",
    "speech": "spoken digit strings with CTC (Free Spoken Digit Dataset)",
    "digits": "handwritten 8×8 digits read row by row (scikit-learn's bundled set)",
    "sentiment": "sentence sentiment (SST-2)",
    "tagging": "slot filling / NER with intent (ATIS, CoNLL)",
    "translate": "encoder-decoder translation (generated dates, TSV pairs, Multi30k)",
    "music": "polyphonic music (JSB Chorales piano rolls)",
}

# the data option --data sets, per task: (option, takes several paths)
DATA_OPTIONS = {"charlm": ("files", True), "speech": ("recordings", False),
                "music": ("path", False), "tagging": ("train", False),
                "translate": ("path", False)}


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return importlib.import_module(f"rnnkit.tasks.{name}")


def merge_config(base: dict[str, Any], update: dict[str, Any], source: str,
                 task: str, path: str = "") -> dict[str, Any]:
    """``update`` over ``base``, recursively; an option ``base`` does not have is named."""
    merged = dict(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if not path and key == "task":
            if value != task:
                raise ValueError(f"{source}: this is a {value!r} config, not a {task} one")
            continue
        if key not in base:
            known = ", ".join(sorted(base))
            raise ValueError(f"{source}: unknown option {where} for the {task} task; "
                             f"known here: {known}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {where!r} must be a mapping of options")
            merged[key] = merge_config(base[key], value, source, task, f"{where}.")
        else:
            merged[key] = value
    return merged
