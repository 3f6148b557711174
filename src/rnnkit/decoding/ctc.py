"""Decoding CTC outputs: greedy (best path) and prefix beam search with language-model fusion.

Prefix beam search (Graves 2012; Hannun et al. 2014) keeps, for every label prefix, the
probability of all alignments ending in a blank and of those ending in its last label, so that
"a a" (repeat) and "a ∅ a" (two labels) are told apart. With a language model the beam is ranked
by shallow fusion::

    score(prefix) = log P_ctc(prefix | x) + α · log P_lm(prefix) + β · len(prefix)

Two implementations compute it. ``csrc/ctc_decode.cpp`` is a C++ decoder (greedy and prefix
beam search over a batch, one utterance per thread, compiled on first use like the CTC loss's
kernel); it is what runs whenever no language model is given. The pure-Python code in this file
is the reference it is tested against (same n-best, same order, same scores: the C++ repeats its
float64 arithmetic operation for operation and its tie-breaking), the fallback where the kernel
cannot be built (with a one-time warning saying why), and the decoder used **with a language
model**: an LM is arbitrary Python (a torch model queried label by label), so with ``lm=`` the
search runs here, in Python, and calls it directly. ``backend="python"`` / ``"native"`` pick one
explicitly.

Greedy decoding takes any input (a NaN frame decodes as torch.max reads it). Prefix beam search
refuses a NaN or +inf log-probability with an error naming the entry: sorting NaN scores has no
defined order, so no two implementations could agree on it (−inf is fine: an impossible class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rnnkit.native import NativeExtension
from rnnkit.validation import integer_values

BACKENDS = ("auto", "native", "python")

# -ffp-contract=off: the C++ must round exactly where the Python reference rounds (a fused
# multiply-add in `total + β·len` would differ from it in the last bit and could reorder ties).
_EXTENSION = NativeExtension(
    "rnnkit_ctc_decode",
    [Path(__file__).with_name("csrc") / "ctc_decode.cpp"],
    extra_cflags=("-O3", "-ffp-contract=off"),
    ops_namespace="rnnkit_ctc_decode",
)


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


def native_unavailable_reason() -> str | None:
    """None if the C++ decoder is usable (building it on first call), else why it is not."""
    return _EXTENSION.unavailable_reason()


def _native_ops(backend: str) -> Any | None:
    """``torch.ops.rnnkit_ctc_decode`` if ``backend`` allows it and it is built, else None."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "python":
        return None
    return _EXTENSION.load_for(backend, "rnnkit.decoding's native CTC decoder",
                               "the slower pure-Python one")


def _batch_arguments(log_probs: Tensor, lengths: Sequence[int] | Tensor | None,
                     blank: int) -> tuple[Tensor, Tensor]:
    """(T, N, C) log_probs as a CPU float tensor and its (N,) int64 lengths, checked."""
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (T, N, C), got shape {tuple(log_probs.shape)}")
    if not log_probs.is_floating_point():
        raise TypeError(f"log_probs must be floating point, got {log_probs.dtype}")
    steps, batch, classes = log_probs.shape
    if not 0 <= blank < classes:
        raise ValueError(f"blank index {blank} is outside the {classes} classes")
    if lengths is None:
        lengths_tensor = torch.full((batch,), steps, dtype=torch.int64)
    else:
        lengths_tensor = integer_values("lengths", lengths)
        if lengths_tensor.shape != (batch,):
            raise ValueError(f"lengths must have one entry per utterance ({batch}), got shape "
                             f"{tuple(lengths_tensor.shape)}")
        outside = ((lengths_tensor < 0) | (lengths_tensor > steps)).nonzero().flatten()
        if outside.numel():
            n = int(outside[0])
            raise ValueError(f"lengths[{n}] = {int(lengths_tensor[n])} is outside [0, {steps}] "
                             f"(the frames of log_probs)")
    values = log_probs.detach().to("cpu")
    if values.dtype not in (torch.float32, torch.float64):
        values = values.to(torch.float64)  # exact: half and bfloat16 are subsets of float64
    return values, lengths_tensor


def _check_searchable(log_probs: Tensor, lengths: Tensor) -> None:
    """Refuses a NaN or +inf within the lengths (see the module's docstring), naming it."""
    steps = log_probs.shape[0]
    inside = (torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)
    bad = (log_probs.isnan() | log_probs.isposinf()) & inside
    if bool(bad.any()):
        t, n, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"log_probs[{t}, {n}, {c}] is {float(log_probs[t, n, c])}: prefix "
                         f"beam search takes log-probabilities (finite, or -inf)")


def _hypotheses(outputs: tuple[Tensor, Tensor, Tensor, Tensor]) -> list[list[Hypothesis]]:
    """The C++ decoder's packed results as hypotheses, per utterance, best first."""
    labels, timesteps, sizes, scores = outputs
    labels_list, timesteps_list = labels.tolist(), timesteps.tolist()
    result: list[list[Hypothesis]] = []
    at_label = at_step = 0
    for utterance_sizes, utterance_scores in zip(sizes.tolist(), scores.tolist()):
        found = []
        for (label_count, step_count), (score, log_prob) in zip(utterance_sizes,
                                                                  utterance_scores):
            if label_count < 0:
                break
            found.append(Hypothesis(labels_list[at_label:at_label + label_count],
                                    timesteps_list[at_step:at_step + step_count], score,
                                    log_prob))
            at_label += label_count
            at_step += step_count
        result.append(found)
    return result


def greedy_decode(log_probs: Tensor, blank: int = 0, backend: str = "auto") -> Hypothesis:
    """Best path: the most likely class per frame, repeats collapsed, blanks dropped."""
    if log_probs.dim() != 2:
        _as_2d(log_probs)  # the error naming the shape
    return decode_batch(log_probs.unsqueeze(1), blank=blank, beam_width=1, backend=backend)[0]


def _greedy_reference(log_probs: Tensor, blank: int = 0) -> Hypothesis:
    """The pure-Python greedy decoder: the reference for csrc/ctc_decode.cpp's."""
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
    backend: str = "auto",
    beam_threshold: float | None = None,
) -> list[Hypothesis]:
    """The ``nbest`` (default: ``beam_width``) best transcriptions of one utterance, best first.

    ``log_probs`` (T, C) are per-frame log-probabilities. ``lm`` adds shallow fusion with weight
    ``alpha`` and a per-label insertion bonus ``beta``. ``prune_below`` skips, at each frame, the
    classes whose log-probability is below it (a common speed-up; None keeps all).
    ``beam_threshold`` drops, at each frame, the prefixes scoring more than it below the best one
    (pyctcdecode's ``beam_prune_logp``, torchaudio's ``beam_threshold``; None keeps
    ``beam_width``).
    """
    if log_probs.dim() != 2:
        _as_2d(log_probs)  # the error naming the shape
    return prefix_beam_search_batch(log_probs.unsqueeze(1), None, beam_width, blank, lm, alpha,
                                    beta, nbest, prune_below, backend, beam_threshold)[0]


def prefix_beam_search_batch(
    log_probs: Tensor,
    lengths: Sequence[int] | Tensor | None = None,
    beam_width: int = 8,
    blank: int = 0,
    lm: LabelScorer | None = None,
    alpha: float = 0.5,
    beta: float = 0.0,
    nbest: int | None = None,
    prune_below: float | None = None,
    backend: str = "auto",
    beam_threshold: float | None = None,
) -> list[list[Hypothesis]]:
    """:func:`prefix_beam_search` of every utterance of a (T, N, C) batch (the first
    ``lengths[n]`` frames of utterance n; None: all T): the n-best list of each.

    Without ``lm`` the C++ decoder runs, the utterances split across torch's intra-op threads.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    if nbest is not None and nbest < 0:
        raise ValueError(f"nbest must be at least 1 (or None: beam_width), got {nbest}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if beam_threshold is not None and not beam_threshold >= 0:
        raise ValueError(f"beam_threshold must be at least 0 (or None), got {beam_threshold}")
    values, lengths_tensor = _batch_arguments(log_probs, lengths, blank)
    _check_searchable(values, lengths_tensor)
    ops = _native_ops(backend) if lm is None else None
    if lm is not None and backend == "native":
        raise ValueError("the native CTC decoder takes no language model: with lm= the search "
                         "runs in Python (backend='auto' or 'python')")
    if ops is not None:
        return _hypotheses(ops.beam(values, lengths_tensor, beam_width, blank, float(beta),
                                    None if prune_below is None else float(prune_below),
                                    nbest or beam_width,
                                    None if beam_threshold is None else float(beam_threshold)))
    return [_prefix_beam_search_reference(values[:length, n], beam_width, blank, lm, alpha, beta,
                                          nbest, prune_below, beam_threshold)
            for n, length in enumerate(lengths_tensor.tolist())]


def _prefix_beam_search_reference(
    log_probs: Tensor,
    beam_width: int = 8,
    blank: int = 0,
    lm: LabelScorer | None = None,
    alpha: float = 0.5,
    beta: float = 0.0,
    nbest: int | None = None,
    prune_below: float | None = None,
    beam_threshold: float | None = None,
) -> list[Hypothesis]:
    """The pure-Python prefix beam search of one utterance (T, C): the reference for
    csrc/ctc_decode.cpp's, and the search that runs with a language model."""
    log_probs = _as_2d(log_probs)
    classes = log_probs.shape[1]
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
        ranked = ranked[:beam_width]
        if beam_threshold is not None:
            floor = fused(*ranked[0]) - beam_threshold
            ranked = [item for item in ranked if fused(*item) >= floor]
        beams = dict(ranked)

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
    beam_width: int = 1, backend: str = "auto", **beam_options: Any,
) -> list[Hypothesis]:
    """Best hypothesis per utterance of a (T, N, C) batch: greedy for beam_width 1, else beam."""
    if beam_width != 1:
        beam_options["nbest"] = 1
        return [found[0] for found in prefix_beam_search_batch(
            log_probs, lengths, beam_width, blank, backend=backend, **beam_options)]
    values, lengths_tensor = _batch_arguments(log_probs, lengths, blank)
    ops = _native_ops(backend)
    if ops is not None:
        return [found[0] for found in _hypotheses(ops.greedy(values, lengths_tensor, blank))]
    return [_greedy_reference(values[:length, n], blank)
            for n, length in enumerate(lengths_tensor.tolist())]
