"""Sequence scoring shared by tasks: edit-distance alignment, error rates, confusion counts."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

DELETED = "<del>"
INSERTED = "<ins>"


def align(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]
          ) -> list[tuple[Hashable, Hashable]]:
    """A minimum-edit alignment as (reference item, hypothesis item) pairs.

    A deletion pairs a reference item with ``DELETED``; an insertion pairs ``INSERTED`` with a
    hypothesis item. Ties prefer substitutions, then deletions (a fixed, reproducible choice).
    """
    rows, cols = len(reference), len(hypothesis)
    cost = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        cost[i][0] = i
    for j in range(1, cols + 1):
        cost[0][j] = j
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            change = cost[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1])
            cost[i][j] = min(change, cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    pairs: list[tuple[Hashable, Hashable]] = []
    i, j = rows, cols
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            pairs.append((reference[i - 1], hypothesis[j - 1]))
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            pairs.append((reference[i - 1], DELETED))
            i -= 1
        else:
            pairs.append((INSERTED, hypothesis[j - 1]))
            j -= 1
    return pairs[::-1]


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
    """Substitutions + deletions + insertions turning ``reference`` into ``hypothesis``."""
    return sum(ref != hyp for ref, hyp in align(reference, hypothesis))


def error_rate(references: Sequence[Sequence[Hashable]],
               hypotheses: Sequence[Sequence[Hashable]]) -> float:
    """Total edit distance over total reference length (word/character/digit error rate)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = sum(edit_distance(r, h) for r, h in zip(references, hypotheses))
    return errors / max(1, sum(len(r) for r in references))
