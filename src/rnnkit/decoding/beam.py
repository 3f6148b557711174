"""Beam search over any step function, with length normalisation and n-best lists.

The model is seen only through two callables, so the same search serves seq2seq, a language
model or anything that emits one token at a time:

* ``step(tokens, state) -> (log_probs, state)``: tokens (N,) of the N live hypotheses, their
  next-token log-probabilities (N, V) and the advanced state;
* ``select(state, index) -> state``: the state rows ``index`` (N',) — beam search keeps, drops
  and duplicates hypotheses between steps.

Ranking of finished hypotheses (``length_norm``), with p = Σ log P(tokens) and |y| the number
of generated tokens including ``</s>``::

    "none":   p                       (favours short outputs)
    "length": p / |y|
    "gnmt":   p / ((5 + |y|) / 6)^α   (Wu et al. 2016, GNMT)

Each step expands every live hypothesis by every token and keeps the ``beam_width`` best
candidates by summed log-probability; a kept candidate ending in ``eos`` is finished and leaves
the beam. The search stops when ``beam_width`` hypotheses have finished (the fairseq rule) or
after ``max_length`` tokens; hypotheses still live then are returned as unfinished. With
``beam_width = 1`` this is exactly greedy decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LENGTH_NORMS = ("none", "length", "gnmt")

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]
SelectFn = Callable[[Any, Tensor], Any]


@dataclass
class BeamHypothesis:
    tokens: list[int]  # generated tokens, without bos and without the final eos
    log_prob: float  # Σ model log-probabilities of the tokens (and of eos when finished)
    score: float  # log_prob after length normalisation: what hypotheses are ranked by
    finished: bool  # ended with eos (False: stopped at max_length)


def length_penalty(length: int, mode: str = "none", alpha: float = 0.6) -> float:
    """The divisor of the summed log-probability for a hypothesis of ``length`` tokens."""
    if mode == "none":
        return 1.0
    if mode == "length":
        return float(max(length, 1))
    if mode == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    raise ValueError(f"length_norm must be one of {', '.join(LENGTH_NORMS)}, got {mode!r}")


@torch.no_grad()
def beam_search(
    step: StepFn,
    state: Any,
    select: SelectFn,
    bos: int,
    eos: int,
    beam_width: int = 5,
    max_length: int = 100,
    nbest: int = 1,
    length_norm: str = "none",
    alpha: float = 0.6,
) -> list[BeamHypothesis]:
    """The ``nbest`` best hypotheses of one sequence, best first. ``state`` is for one row."""
    if beam_width < 1 or nbest < 1 or max_length < 1:
        raise ValueError(f"beam_width, nbest and max_length must be ≥ 1, got {beam_width}, "
                         f"{nbest}, {max_length}")
    if nbest > beam_width:
        raise ValueError(f"nbest ({nbest}) cannot exceed beam_width ({beam_width})")
    length_penalty(1, length_norm, alpha)  # validates the mode before any work

    def finish(tokens: list[int], log_prob: float, finished: bool) -> BeamHypothesis:
        generated = len(tokens) + (1 if finished else 0)
        return BeamHypothesis(tokens, log_prob, log_prob / length_penalty(generated, length_norm, alpha),
                              finished)

    live_tokens: list[list[int]] = [[]]
    live_scores = torch.zeros(1, dtype=torch.float64)  # (N,) summed log-probabilities
    last = torch.tensor([bos])  # (N,)
    done: list[BeamHypothesis] = []
    for _ in range(max_length):
        log_probs, state = step(last, state)  # (N, V)
        vocab = log_probs.shape[1]
        # float64 sums: ties and near-ties between beams are ranked the same on every platform
        total = (live_scores.unsqueeze(1) + log_probs.double()).view(-1)  # (N·V,)
        values, flat = total.topk(min(beam_width, total.numel()))
        rows, tokens, scores = [], [], []
        for value, index in zip(values.tolist(), flat.tolist()):
            if value == -math.inf:
                break
            row, token = divmod(index, vocab)
            if token == eos:
                done.append(finish(live_tokens[row], value, True))
            else:
                rows.append(row)
                tokens.append(token)
                scores.append(value)
        if len(done) >= beam_width or not rows:
            live_tokens = []
            break
        live_tokens = [[*live_tokens[r], t] for r, t in zip(rows, tokens)]
        live_scores = torch.tensor(scores, dtype=torch.float64)
        last = torch.tensor(tokens)
        state = select(state, torch.tensor(rows))
    done.extend(finish(t, s, False) for t, s in zip(live_tokens, live_scores.tolist()))
    done.sort(key=lambda h: h.score, reverse=True)
    return done[:nbest]


@torch.no_grad()
def greedy_search(step: StepFn, state: Any, bos: int, eos: int, max_length: int = 100) -> BeamHypothesis:
    """The most likely next token at each step, until ``eos`` or ``max_length`` tokens."""
    tokens: list[int] = []
    log_prob = 0.0
    last = torch.tensor([bos])
    for _ in range(max_length):
        log_probs, state = step(last, state)  # (1, V)
        value, token = log_probs[0].double().max(0)
        log_prob += float(value)
        if int(token) == eos:
            return BeamHypothesis(tokens, log_prob, log_prob, True)
        tokens.append(int(token))
        last = token.view(1)
    return BeamHypothesis(tokens, log_prob, log_prob, False)
