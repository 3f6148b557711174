"""Entity-level precision, recall and F1 over tag sequences, computed as seqeval does.

Chunks are read from the tags the way seqeval's default mode (and the CoNLL ``conlleval``
script) reads them, which accepts BIO (IOB2), IOB1 and BIOES alike: a tag is ``O`` or a prefix
``B``/``I``/``E``/``S`` plus ``-`` plus a type. A chunk ends before a ``B``/``S``/``O``, after an
``E``/``S``, or where the type changes; it starts at a ``B``/``S``, at an ``I``/``E`` that follows
``O``/``E``/``S``, or where the type changes. So a stray ``I-LOC`` after ``O`` starts a chunk, and
``B-PER I-LOC`` is two chunks. An entity counts as correct only if its type, first and last
token all match a reference entity (exact span + type).

Scores are micro-averaged over all entities of all sentences (seqeval's ``f1_score``), with
per-type scores beside them (its ``classification_report``). Undefined ratios are 0.

Example::

    >>> get_entities(["B-PER", "I-PER", "O", "B-LOC"])
    [('PER', 0, 1), ('LOC', 3, 3)]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

Entity = tuple[str, int, int]  # (type, first token, last token), inclusive


def _split(tag: str) -> tuple[str, str]:
    """"B-PER" → ("B", "PER"); "O" → ("O", ""). A bare prefix ("B") has type "_" as in seqeval."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix[:1], kind or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != kind


def _starts(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if tag in ("I", "E") and prev_tag in ("O", "E", "S"):
        return True
    return tag != "O" and prev_type != kind


def get_entities(tags: Sequence[str]) -> list[Entity]:
    """The chunks of one sentence's tags, in order."""
    entities: list[Entity] = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, raw in enumerate([*tags, "O"]):  # the sentinel O closes a chunk at the end
        tag, kind = _split(raw)
        if _ends(prev_tag, tag, prev_type, kind):
            entities.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, kind):
            begin = i
        prev_tag, prev_type = tag, kind
    return entities


@dataclass
class EntityScores:
    precision: float
    recall: float
    f1: float
    predicted: int  # entities in the predictions
    actual: int  # entities in the references
    correct: int
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)


def _prf(correct: int, predicted: int, actual: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_scores(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]
                  ) -> EntityScores:
    """Micro precision / recall / F1 of exact (type, span) matches over all sentences."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference sentences but {len(predictions)} predicted")
    actual: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    for number, (ref, hyp) in enumerate(zip(references, predictions)):
        if len(ref) != len(hyp):
            raise ValueError(f"sentence {number}: {len(ref)} reference tags but {len(hyp)} predicted")
        gold, guess = set(get_entities(ref)), set(get_entities(hyp))
        actual.update(kind for kind, _, _ in gold)
        predicted.update(kind for kind, _, _ in guess)
        correct.update(kind for kind, _, _ in gold & guess)
    by_type = {}
    for kind in sorted(set(actual) | set(predicted)):
        p, r, f = _prf(correct[kind], predicted[kind], actual[kind])
        by_type[kind] = {"precision": p, "recall": r, "f1": f, "support": float(actual[kind])}
    total = (sum(correct.values()), sum(predicted.values()), sum(actual.values()))
    p, r, f = _prf(*total)
    return EntityScores(p, r, f, total[1], total[2], total[0], by_type)
