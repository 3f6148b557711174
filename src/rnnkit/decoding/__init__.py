"""Turning network outputs into sequences: CTC greedy / prefix beam search, and generic beam search."""

from rnnkit.decoding.beam import beam_search, greedy_search
from rnnkit.decoding.ctc import (
    Hypothesis,
    LabelScorer,
    decode_batch,
    greedy_decode,
    prefix_beam_search,
    prefix_beam_search_batch,
)

__all__ = [
    "Hypothesis",
    "LabelScorer",
    "beam_search",
    "decode_batch",
    "greedy_decode",
    "greedy_search",
    "prefix_beam_search",
    "prefix_beam_search_batch",
]
