"""The applications rnnkit trains, one module each, all with the same interface.

A task module has ``NAME``, ``default_config()`` (sections ``data``, ``model``, ``train``, …),
``build(config) -> (task, model, source_description)`` and ``load_model(path)``; optionally
``report(task, model, config, out)`` for what to print after training (test scores with the chosen
weights, examples, a confusion matrix). Its validation scores are module functions over given data,
so :mod:`rnnkit.pipelines` (``rnnkit.load``) evaluates any file with the same code.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

from rnnkit.options import TaskSchema

TASKS = {
    "charlm": "character-level language model (default data: the Python standard library)",
    "wordlm": "word-level language model (Penn Treebank)",
    "speech": "spoken digit strings with CTC (Free Spoken Digit Dataset)",
    "digits": "handwritten 8×8 digits read row by row (scikit-learn's bundled set)",
    "sentiment": "sentence sentiment (SST-2)",
    "tagging": "slot filling / NER with intent (ATIS, CoNLL)",
    "translate": "encoder-decoder translation (generated dates, TSV pairs, Multi30k)",
    "music": "polyphonic music (JSB Chorales piano rolls)",
    "trees": "sentiment on SST parse trees: Tree-LSTM vs sequence models (SST trees)",
    "adding": "the adding problem: remember two marked values over T steps (generated)",
    "copymemory": "the copy memory problem: repeat 10 digits after T blanks (generated)",
}

# per task: the data it reads (what --data takes: rnnkit.tasks.layouts); the default data
# location is rnnkit.tasks.common.shared_root()
TASK_DATA = {
    "charlm": "any UTF-8 text file(s); default: the Python standard library's source",
    "wordlm": "Penn Treebank text, one sentence per line (ptb/ptb.{train,valid}.txt)",
    "speech": ("a folder of {digit}_{speaker}_{take}.wav, 8 kHz mono (FSDD recordings); "
               "utterances are spliced from them"),
    "digits": "scikit-learn's bundled 8×8 digits (needs scikit-learn)",
    "sentiment": "TSV sentence<TAB>label (SST-2: sst2/train.tsv, sst2/dev.tsv)",
    "tagging": ("ATIS folders (seq.in, seq.out, label) or CoNLL token/tag columns "
                "(--format conll)"),
    "translate": ("generated dates (no files), TSV source<TAB>target pairs or the Multi30k "
                  "folder"),
    "music": "a .mat file of piano rolls, train/valid/test (JSB Chorales; needs scipy)",
    "trees": "SST bracketed parse trees, one per line (sst-trees/train.txt, sst-trees/dev.txt)",
    "adding": "generated (no files)",
    "copymemory": "generated (no files)",
}


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return importlib.import_module(f"rnnkit.tasks.{name}")


@functools.cache
def task_schema(name: str) -> TaskSchema:
    """Every option of the task, with its type, range, help and the task's default."""
    return TaskSchema.of(task_module(name))


def merge_config(base: dict[str, Any], update: dict[str, Any], source: str,
                 task: str) -> dict[str, Any]:
    """``update`` over ``base``, every value checked (:meth:`TaskSchema.merge`)."""
    return task_schema(task).merge(base, update, source)
