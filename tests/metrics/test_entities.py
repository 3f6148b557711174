"""Entity extraction and scores, against cases worked by hand (and seqeval's documented ones)."""

from __future__ import annotations

import pytest

from rnnkit.metrics.entities import entity_scores, get_entities


def test_bio_chunks() -> None:
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # B after B of the same type: two entities; a sentence may end inside an entity
    assert get_entities(["B-LOC", "B-LOC", "I-LOC"]) == [("LOC", 0, 0), ("LOC", 1, 2)]
    # dotted ATIS types are one type
    assert get_entities(["O", "B-fromloc.city_name", "I-fromloc.city_name"]) == [
        ("fromloc.city_name", 1, 2)]


def test_ill_formed_bio_is_read_as_conlleval_does() -> None:
    # a stray I- after O starts an entity; a type change inside I- run splits it
    assert get_entities(["O", "I-MISC", "I-MISC"]) == [("MISC", 1, 2)]
    assert get_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert get_entities(["I-PER"]) == [("PER", 0, 0)]


def test_bioes_chunks() -> None:
    tags = ["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "B-ORG", "E-ORG", "S-ORG"]
    assert get_entities(tags) == [("PER", 0, 0), ("LOC", 1, 3), ("ORG", 5, 6), ("ORG", 7, 7)]
    # E then I of the same type: a new entity starts (the E closed the previous one)
    assert get_entities(["B-X", "E-X", "I-X", "E-X"]) == [("X", 0, 1), ("X", 2, 3)]


def test_scores_of_seqeval_readme_example() -> None:
    truth = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    guess = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_scores(truth, guess)
    # MISC span 2-5 vs 3-5: wrong; PER right. 1 correct of 2 predicted, of 2 actual
    assert (scores.correct, scores.predicted, scores.actual) == (1, 2, 2)
    assert scores.precision == scores.recall == scores.f1 == 0.5
    assert scores.by_type["MISC"]["f1"] == 0.0 and scores.by_type["PER"]["f1"] == 1.0


def test_scores_worked_by_hand() -> None:
    truth = [["B-A", "I-A", "O", "B-B"], ["B-A", "O", "B-C", "I-C"]]
    guess = [["B-A", "I-A", "O", "B-A"], ["B-A", "O", "B-C", "O"]]
    # true: A0-1, B3, A0, C2-3 (4); predicted: A0-1, A3, A0, C2 (4); correct: A0-1, A0 (2)
    scores = entity_scores(truth, guess)
    assert (scores.correct, scores.predicted, scores.actual) == (2, 4, 4)
    assert scores.f1 == pytest.approx(0.5)
    assert scores.by_type["A"]["precision"] == pytest.approx(2 / 3)  # A3 is spurious
    assert scores.by_type["A"]["recall"] == 1.0
    assert scores.by_type["B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1.0}
    # entities never cross sentences: the same tags as one sentence would score differently
    assert entity_scores([["B-A"], ["I-A"]], [["B-A"], ["I-A"]]).actual == 2


def test_empty_and_mismatched() -> None:
    scores = entity_scores([["O", "O"]], [["O", "O"]])
    assert (scores.precision, scores.recall, scores.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="sentence 0: 2 reference tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])


def test_iob1_chunks_by_hand() -> None:
    # CoNLL-2003's IOB1: I- opens an entity; B- only splits two touching entities of one type
    assert get_entities(["I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert get_entities(["I-LOC", "B-LOC", "I-LOC"]) == [("LOC", 0, 0), ("LOC", 1, 2)]
    assert get_entities(["I-PER", "I-ORG", "I-ORG"]) == [("PER", 0, 0), ("ORG", 1, 2)]
    assert get_entities(["O", "B-MISC", "I-MISC"]) == [("MISC", 1, 2)]


def test_iob1_scores_by_hand_and_as_seqeval() -> None:
    truth = [["I-ORG", "O", "I-MISC", "O", "O", "O", "I-MISC", "O", "O"],
             ["I-PER", "I-PER"], ["I-LOC", "B-LOC", "O", "I-PER"]]
    # the same entities written in IOB2 are all correct: only spans and types count
    same = [["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"],
            ["B-PER", "I-PER"], ["B-LOC", "B-LOC", "O", "B-PER"]]
    assert entity_scores(truth, same).f1 == 1.0
    # merged LOCs (one wrong entity, two missed), a PER cut short, a spurious ORG
    guess = [["I-ORG", "O", "I-MISC", "O", "I-ORG", "O", "I-MISC", "O", "O"],
             ["I-PER", "O"], ["I-LOC", "I-LOC", "O", "I-PER"]]
    scores = entity_scores(truth, guess)
    # truth 7 entities; guess 7 (ORG, MISC, ORG, MISC, PER0-0, LOC0-1, PER); correct 4
    assert (scores.correct, scores.predicted, scores.actual) == (4, 7, 7)
    assert scores.by_type["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2.0}
    assert scores.by_type["PER"]["recall"] == 0.5
    seqeval_metrics = pytest.importorskip("seqeval.metrics")
    assert scores.f1 == pytest.approx(seqeval_metrics.f1_score(truth, guess, mode=None), abs=1e-12)
