"""Turning network outputs into label sequences: CTC greedy and prefix beam-search decoding."""

from rnnkit.decoding.ctc import (
    Hypothesis,
    LabelScorer,
    decode_batch,
    greedy_decode,
    prefix_beam_search,
)

__all__ = ["Hypothesis", "LabelScorer", "decode_batch", "greedy_decode", "prefix_beam_search"]
