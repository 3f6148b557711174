"""Corpus BLEU and 13a tokenisation against cases computed by hand."""

from __future__ import annotations

import math

import pytest

from rnnkit.metrics.bleu import corpus_bleu, tokenize_13a


def test_13a_tokenisation() -> None:
    assert tokenize_13a("Hello, world.") == "Hello , world ."
    assert tokenize_13a("It costs $3.50 (or 3,50€)!") == "It costs $ 3.50 ( or 3,50€ ) !"
    assert tokenize_13a("2026-11-24") == "2026 - 11 - 24"  # a dash after a digit splits
    assert tokenize_13a("well-known") == "well-known"  # ... other dashes do not
    assert tokenize_13a("a &amp; b &quot;c&quot;") == 'a & b " c "'
    assert tokenize_13a("  spaced \n  out ") == "spaced out"


def test_sentence_worked_by_hand() -> None:
    # hyp: the cat sat on the mat / ref: the cat is on the mat (6 tokens each, BP = 1)
    # 1-grams 5/6 (the×2, cat, on, mat), 2-grams 3/5 (the cat, on the, the mat),
    # 3-grams 1/4 (on the mat), 4-grams 0/3 → exp smoothing: 1 / (2·3)
    bleu = corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"])
    assert bleu.correct == [5, 3, 1, 0] and bleu.total == [6, 5, 4, 3]
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu.score == pytest.approx(expected)  # 37.99
    assert bleu.precisions[3] == pytest.approx(100 / 6)
    assert bleu.brevity_penalty == 1.0


def test_corpus_statistics_are_pooled_and_short_output_penalised() -> None:
    # counts are summed over sentences before dividing; c = 3 + 4 = 7 < r = 4 + 5 = 9
    bleu = corpus_bleu(["a b c", "d e f g"], ["a b c d", "d e f g h"])
    assert bleu.correct == [7, 5, 3, 1] and bleu.total == [7, 5, 3, 1]
    assert bleu.brevity_penalty == pytest.approx(math.exp(1 - 9 / 7))
    assert bleu.score == pytest.approx(100 * math.exp(1 - 9 / 7))
    assert corpus_bleu(["x y z w"], ["x y z w"]).score == pytest.approx(100.0)


def test_multiple_references_clip_by_the_maximum_and_pick_the_closest_length() -> None:
    # "the the the": clipped by max count over refs (2 in ref 2); lengths 3 vs refs 2 and 4 →
    # both at distance 1, the shorter (2) is used, so no brevity penalty
    bleu = corpus_bleu(["the the the"], [["the cat"], ["the the big cat"]])
    assert bleu.correct[0] == 2 and bleu.ref_len == 2 and bleu.brevity_penalty == 1.0
    with pytest.raises(ValueError, match="2 hypotheses but a reference stream of 1"):
        corpus_bleu(["a", "b"], ["a"])
