"""Decoding CTC outputs: greedy (best path) and prefix beam search with language-model fusion.

Prefix beam search (Graves 2012; Hannun et al. 2014) keeps, for every label prefix, the
probability of all alignments ending in a blank and of those ending in its last label, so that
"a a" (repeat) and "a ∅ a" (two labels) are told apart. With a language model the beam is ranked
by shallow fusion::

    score(prefix) = log P_ctc(prefix | x) + α · log P_lm(prefix) + β · len(prefix)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


class LabelScorer(Protocol):
    """A language model over labels, queried one label at a time."""

    def initial_state(self) -> Any:
        """The state before any label."""

    def score(self, state: Any, label: int) -> tuple[float, Any]:
        """``(log P(label | history), state after label)``."""


@dataclass
class Hypothesis:
    """One transcription: its labels, the frame each label starts at, and its scores."""

    labels: list[int]
    timesteps: list[int]
    score: float  # what the beam is ranked by: log_prob + α·lm_log_prob + β·len
    log_prob: float  # log P_ctc(labels | x), summed over all alignments (greedy: the best path)
    lm_log_prob: float = 0.0


def _as_2d(log_probs: Tensor) -> Tensor:
    if log_probs.dim() != 2:
        raise ValueError(
            f"log_probs of one utterance must be (T, C), got shape {tuple(log_probs.shape)}"
        )
    return log_probs.detach().to("cpu", torch.float64)


def greedy_decode(log_probs: Tensor, blank: int = 0) -> Hypothesis:
    """Best path: the most likely class per frame, repeats collapsed, blanks dropped."""
    log_probs = _as_2d(log_probs)
    best_logp, best = log_probs.max(dim=1)
    labels: list[int] = []
    timesteps: list[int] = []
    previous = blank
    for t, label in enumerate(best.tolist()):
        if label != blank and label != previous:
            labels.append(label)
            timesteps.append(t)
        previous = label
    path = float(best_logp.sum())
    return Hypothesis(labels, timesteps, path, path)


@dataclass
class _Beam:
    blank: float = -math.inf  # log P(alignments of this prefix ending in blank)
    label: float = -math.inf  # log P(alignments ending in the prefix's last label)
    timesteps: list[int] = field(default_factory=list)
    lm_log_prob: float = 0.0
    lm_state: Any = None
    # within one frame: the prefix carried on from the last frame vs newly started here; the
    # last label's timestep is where the likelier of the two puts it
    carried: float = -math.inf
    started: float = -math.inf
    started_timesteps: list[int] = field(default_factory=list)

    @property
    def total(self) -> float:
        return _logaddexp(self.blank, self.label)


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = (a, b) if a > b else (b, a)
    return high + math.log1p(math.exp(low - high))


def prefix_beam_search(
    log_probs: Tensor,
    beam_width: int = 8,
    blank: int = 0,
    lm: LabelScorer | None = None,
    alpha: float = 0.5,
    beta: float = 0.0,
    nbest: int | None = None,
    prune_below: float | None = None,
) -> list[Hypothesis]:
    """The ``nbest`` (default: ``beam_width``) best transcriptions of one utterance, best first.

    ``log_probs`` (T, C) are per-frame log-probabilities. ``lm`` adds shallow fusion with weight
    ``alpha`` and a per-label insertion bonus ``beta``. ``prune_below`` skips, at each frame, the
    classes whose log-probability is below it (a common speed-up; None keeps all).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    log_probs = _as_2d(log_probs)
    classes = log_probs.shape[1]
    if not 0 <= blank < classes:
        raise ValueError(f"blank index {blank} is outside the {classes} classes")
    lm_weight = alpha if lm is not None else 0.0

    def fused(prefix: tuple[int, ...], beam: _Beam) -> float:
        return beam.total + lm_weight * beam.lm_log_prob + beta * len(prefix)

    beams: dict[tuple[int, ...], _Beam] = {
        (): _Beam(blank=0.0, lm_state=lm.initial_state() if lm is not None else None)
    }
    for t, row in enumerate(log_probs.tolist()):
        candidates = [c for c in range(classes) if c != blank
                      and (prune_below is None or row[c] >= prune_below)]
        following: dict[tuple[int, ...], _Beam] = {}
        for prefix, beam in beams.items():
            stay = _entry(following, beams, prefix, beam, None, lm)
            carried = beam.total + row[blank]
            stay.blank = _logaddexp(stay.blank, carried)
            if prefix:
                # the last label again without a blank between: the same prefix, not a new label
                repeat = beam.label + row[prefix[-1]]
                stay.label = _logaddexp(stay.label, repeat)
                carried = _logaddexp(carried, repeat)
            stay.carried = _logaddexp(stay.carried, carried)
            for c in candidates:
                extended = _entry(following, beams, (*prefix, c), beam, c, lm)
                # a repeated label only counts as a new label after a blank
                source = beam.blank if prefix and c == prefix[-1] else beam.total
                started = source + row[c]
                extended.label = _logaddexp(extended.label, started)
                if started > extended.started:
                    extended.started = started
                    extended.started_timesteps = [*beam.timesteps, t]
        for beam in following.values():
            if beam.started > beam.carried:
                beam.timesteps = beam.started_timesteps
            beam.carried = beam.started = -math.inf
        ranked = sorted(following.items(), key=lambda item: fused(*item), reverse=True)
        beams = dict(ranked[:beam_width])

    ranked = sorted(beams.items(), key=lambda item: fused(*item), reverse=True)
    return [
        Hypothesis(list(prefix), list(beam.timesteps), fused(prefix, beam), beam.total,
                   beam.lm_log_prob)
        for prefix, beam in ranked[: nbest or beam_width]
    ]


def _entry(following: dict[tuple[int, ...], _Beam], beams: dict[tuple[int, ...], _Beam],
           prefix: tuple[int, ...], parent: _Beam, label: int | None,
           lm: LabelScorer | None) -> _Beam:
    """The beam of ``prefix`` at this frame, created on first use (with its LM score)."""
    beam = following.get(prefix)
    if beam is not None:
        return beam
    known = beams.get(prefix) if label is not None else parent
    if known is not None:
        beam = _Beam(timesteps=known.timesteps, lm_log_prob=known.lm_log_prob,
                     lm_state=known.lm_state)
    else:
        lm_log_prob, lm_state = parent.lm_log_prob, None
        if lm is not None:
            step, lm_state = lm.score(parent.lm_state, label)
            lm_log_prob += step
        beam = _Beam(lm_log_prob=lm_log_prob, lm_state=lm_state)
    following[prefix] = beam
    return beam


def decode_batch(
    log_probs: Tensor, lengths: Sequence[int] | Tensor | None = None, blank: int = 0,
    beam_width: int = 1, **beam_options: Any,
) -> list[Hypothesis]:
    """Best hypothesis per utterance of a (T, N, C) batch: greedy for beam_width 1, else beam."""
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (T, N, C), got shape {tuple(log_probs.shape)}")
    steps, batch, _ = log_probs.shape
    lengths_list = [steps] * batch if lengths is None else [int(v) for v in lengths]
    results = []
    for n, length in enumerate(lengths_list):
        frames = log_probs[:length, n]
        if beam_width == 1:
            results.append(greedy_decode(frames, blank))
        else:
            results.append(prefix_beam_search(frames, beam_width, blank, **beam_options)[0])
    return results
