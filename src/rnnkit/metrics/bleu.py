"""Corpus BLEU as sacrebleu computes it by default (``sacrebleu.corpus_bleu(hyps, [refs])``).

* tokenisation ``13a`` (the mteval-v13a script's): unescape a few HTML entities, split off
  punctuation and symbols, split ``.``/``,`` unless between digits and ``-`` after a digit;
* n-grams of orders 1–4, counts clipped by the reference (the maximum over references), summed
  over the whole corpus before dividing — not an average of sentence scores;
* no n-gram of any order matching scores 0 with every precision 0 (sacrebleu returns early
  there; smoothing alone would give a few points to output sharing no word with the reference);
* ``exp`` smoothing: an order with no match gets precision 1 / (2^k · total), k counting the
  orders so far without a match;
* brevity penalty exp(1 − r / c) when the corpus hypothesis length c is below the reference
  length r (per sentence, the reference length closest to the hypothesis, shorter on ties).

Scores are on sacrebleu's 0–100 scale.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ORDER = 4

_RULES_13A = [
    # punctuation and symbols: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... or unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> str:
    """sacrebleu's default tokeniser: the tokens of ``line`` joined by single spaces."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = (line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                .replace("&gt;", ">"))
    line = f" {line} "
    for pattern, replacement in _RULES_13A:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def _ngrams(tokens: list[str], order: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))


@dataclass
class BLEU:
    score: float  # 0-100
    precisions: list[float]  # per order, 0-100, after smoothing
    brevity_penalty: float
    hyp_len: int
    ref_len: int
    correct: list[int]
    total: list[int]

    def __str__(self) -> str:
        shown = "/".join(f"{p:.1f}" for p in self.precisions)
        return (f"BLEU = {self.score:.2f} {shown} (BP = {self.brevity_penalty:.3f} "
                f"ratio = {self.hyp_len / max(1, self.ref_len):.3f} hyp_len = {self.hyp_len} "
                f"ref_len = {self.ref_len})")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]] | Sequence[str]
                ) -> BLEU:
    """BLEU of detokenised hypothesis strings against one reference stream (a list of strings,
    one per hypothesis) or several (a list of such lists), as ``sacrebleu.corpus_bleu``."""
    streams: list[Sequence[str]] = ([references] if references and isinstance(references[0], str)
                                    else list(references))  # type: ignore[list-item]
    for stream in streams:
        if len(stream) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} hypotheses but a reference stream of {len(stream)}")
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    hyp_len = ref_len = 0
    for i, hypothesis in enumerate(hypotheses):
        hyp = tokenize_13a(hypothesis).split()
        refs = [tokenize_13a(stream[i]).split() for stream in streams]
        hyp_len += len(hyp)
        # the closest reference length; on a tie the shorter one
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for order in range(1, MAX_ORDER + 1):
            counts = _ngrams(hyp, order)
            clip: Counter[tuple[str, ...]] = Counter()
            for ref in refs:
                clip |= _ngrams(ref, order)  # max count over references
            correct[order - 1] += sum(min(c, clip[g]) for g, c in counts.items())
            total[order - 1] += max(0, len(hyp) - order + 1)
    if hyp_len < ref_len:
        penalty = math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0
    else:
        penalty = 1.0
    precisions = [0.0] * MAX_ORDER
    if not any(correct):
        return BLEU(0.0, precisions, penalty, hyp_len, ref_len, correct, total)
    smooth = 1.0
    for n in range(MAX_ORDER):
        if total[n] == 0:
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    log_mean = sum(math.log(p) if p > 0 else -9_999_999_999 for p in precisions) / MAX_ORDER
    return BLEU(penalty * math.exp(log_mean), precisions, penalty, hyp_len, ref_len, correct, total)
