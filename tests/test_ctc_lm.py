"""Shallow fusion with an rnnkit character LM: scores equal the LM's own sequence log-probability."""

from __future__ import annotations

import pytest
import torch

from rnnkit.data.vocab import CharVocab
from rnnkit.decoding import prefix_beam_search
from rnnkit.decoding.lm import CharLMScorer
from rnnkit.models.language_model import LanguageModel, LMConfig


def _model_and_vocab() -> tuple[LanguageModel, CharVocab]:
    torch.manual_seed(0)
    vocab = CharVocab.from_text("0123456789\n")
    model = LanguageModel(LMConfig(vocab_size=len(vocab), layers=1, hidden=16, embedding=8))
    return model.eval(), vocab


def test_scores_add_up_to_the_lm_log_probability() -> None:
    model, vocab = _model_and_vocab()
    scorer = CharLMScorer(model, vocab, ["", *"0123456789"])  # label d + 1 is digit d
    state, total = scorer.initial_state(), 0.0
    for label in (4, 2, 2):  # "311"
        step, state = scorer.score(state, label)
        total += step
    tokens = torch.tensor(vocab.encode("\n311")).unsqueeze(1)
    with torch.no_grad():
        logits, _ = model(tokens[:-1])
    log_probs = logits.double().log_softmax(-1)[:, 0]
    expected = sum(float(log_probs[t, tokens[t + 1, 0]]) for t in range(3))
    assert total == pytest.approx(expected, abs=1e-6)


def test_fused_beam_search_runs_with_the_scorer_and_refuses_unknown_labels() -> None:
    model, vocab = _model_and_vocab()
    scorer = CharLMScorer(model, vocab, ["", *"0123456789", "x"])
    log_probs = torch.randn(6, 12).log_softmax(1)
    log_probs[:, 11] = -50.0  # the label without an LM symbol is never proposed
    best = prefix_beam_search(log_probs, beam_width=4, lm=scorer, alpha=0.5, beta=1.0,
                              prune_below=-40.0)
    assert best[0].score == pytest.approx(best[0].log_prob + 0.5 * best[0].lm_log_prob
                                          + len(best[0].labels))
    with pytest.raises(ValueError, match="label 11 has no symbol"):
        scorer.score(scorer.initial_state(), 11)
