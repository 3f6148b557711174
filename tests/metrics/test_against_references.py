"""The hand-written scorers against the libraries that define them: sacrebleu and seqeval."""

from __future__ import annotations

import random

import pytest

from conftest import shared_file
from rnnkit.metrics import corpus_bleu, entity_scores, get_entities

sacrebleu = pytest.importorskip("sacrebleu", reason="the dev extra installs sacrebleu")
seqeval_metrics = pytest.importorskip("seqeval.metrics", reason="the dev extra installs seqeval")

WORDS = ["the", "cat", "sat", "on", "mat", ",", ".", "3.50", "well-known", "2026-11-24", "(x)",
         "a", "dog", "&amp;", "!", "it's", "$5"]


def _sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


@pytest.mark.parametrize("seed", range(6))
def test_bleu_matches_sacrebleu_on_random_corpora(seed: int) -> None:
    rng = random.Random(seed)
    refs = [_sentence(rng, rng.randint(1, 12)) for _ in range(30)]
    # hypotheses: references with words dropped, swapped and replaced, some empty, some short
    hyps = []
    for ref in refs:
        words = ref.split()
        words = [rng.choice(WORDS) if rng.random() < 0.3 else w for w in words
                 if rng.random() > 0.2]
        hyps.append(" ".join(words))
    ours = corpus_bleu(hyps, refs)
    theirs = sacrebleu.corpus_bleu(hyps, [refs])
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)
    assert ours.correct == theirs.counts and ours.total == theirs.totals
    assert (ours.hyp_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)
    assert ours.brevity_penalty == pytest.approx(theirs.bp, abs=1e-12)


def test_bleu_matches_sacrebleu_with_two_references() -> None:
    rng = random.Random(7)
    first = [_sentence(rng, rng.randint(2, 9)) for _ in range(20)]
    second = [_sentence(rng, rng.randint(2, 9)) for _ in range(20)]
    hyps = [_sentence(rng, rng.randint(1, 9)) for _ in range(20)]
    ours = corpus_bleu(hyps, [first, second])
    assert ours.score == pytest.approx(sacrebleu.corpus_bleu(hyps, [first, second]).score, abs=1e-9)


def test_bleu_without_any_matching_word_is_zero_as_in_sacrebleu() -> None:
    # smoothing alone gave output sharing no word with its reference a few BLEU points
    hyps, refs = ["dog ran far away", "blue"], ["the cat sat", "on the mat ."]
    ours, theirs = corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, [refs])
    assert theirs.score == 0.0
    assert ours.score == 0.0 and ours.precisions == theirs.precisions
    assert ours.brevity_penalty == pytest.approx(theirs.bp, abs=1e-12)


def _random_tags(rng: random.Random, length: int, prefixes: str) -> list[str]:
    return ["O" if rng.random() < 0.4 else f"{rng.choice(prefixes)}-{rng.choice('ABC')}"
            for _ in range(length)]


@pytest.mark.parametrize("prefixes", ["BI", "I", "BIES"])  # BIO, IOB1-like (I only), BIOES
def test_entity_f1_matches_seqeval_on_random_tags(prefixes: str) -> None:
    rng = random.Random(len(prefixes))
    truth = [_random_tags(rng, rng.randint(1, 15), prefixes) for _ in range(300)]
    guess = [[t if rng.random() < 0.7 else rng.choice(["O", f"{rng.choice(prefixes)}-A"])
              for t in sentence] for sentence in truth]
    scores = entity_scores(truth, guess)
    assert scores.f1 == pytest.approx(seqeval_metrics.f1_score(truth, guess), abs=1e-12)
    assert scores.precision == pytest.approx(seqeval_metrics.precision_score(truth, guess), abs=1e-12)
    assert scores.recall == pytest.approx(seqeval_metrics.recall_score(truth, guess), abs=1e-12)
    report = seqeval_metrics.classification_report(truth, guess, output_dict=True)
    for kind, theirs in report.items():
        if kind in scores.by_type:
            assert scores.by_type[kind]["f1"] == pytest.approx(theirs["f1-score"], abs=1e-12)
            assert scores.by_type[kind]["support"] == theirs["support"]


def _read_conll(path: object, limit: int) -> list[list[str]]:
    sentences: list[list[str]] = [[]]
    with open(path, encoding="utf-8") as lines:  # type: ignore[call-overload]
        for line in lines:
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if sentences[-1]:
                    sentences.append([])
                    if len(sentences) > limit:
                        break
                continue
            sentences[-1].append(fields[-1])
    return [s for s in sentences if s]


def test_entity_f1_matches_seqeval_on_conll2003_iob1() -> None:
    truth = _read_conll(shared_file("conll2003/eng.testa"), 800)
    # IOB1: entities begin with I-; B- only where two entities of one type touch
    assert sum(t.startswith("I-") for s in truth for t in s) > 1000
    assert not any(t.startswith("B-") for s in truth for t in s[:1])
    assert seqeval_metrics.f1_score(truth, truth) == entity_scores(truth, truth).f1 == 1.0
    rng = random.Random(0)
    # damage the tags: shift boundaries, change types, drop entities
    guess = [[rng.choice(["O", "I-PER", "I-LOC", "B-LOC"]) if rng.random() < 0.15 else t
              for t in sentence] for sentence in truth]
    ours = entity_scores(truth, guess)
    assert ours.f1 == pytest.approx(seqeval_metrics.f1_score(truth, guess), abs=1e-12)
    # seqeval's chunk reader and ours agree sentence by sentence
    from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

    for sentence in guess[:200]:
        assert get_entities(sentence) == seqeval_entities(sentence)
