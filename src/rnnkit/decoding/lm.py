"""A character language model trained by rnnkit, as the label scorer of CTC shallow fusion.

CTC labels map to LM symbols (e.g. label d + 1 → the character "d"); the scorer keeps, for every
beam prefix, the LM's recurrent state and its next-symbol log-probabilities, so extending a
prefix costs one recurrent step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rnnkit.data.vocab import CharVocab
from rnnkit.models.language_model import LanguageModel


class _LMState(NamedTuple):
    recurrent: Any
    log_probs: Tensor  # (V,) log P(next symbol | history)


class CharLMScorer:
    """``LabelScorer`` backed by a character :class:`LanguageModel`.

    ``label_symbols[k]`` is the text of CTC label k (the blank's entry is never used); the LM is
    primed with ``prime`` (default: a newline, where the vocabulary has one) so that the first
    label has a context.
    """

    def __init__(self, model: LanguageModel, vocab: CharVocab, label_symbols: Sequence[str],
                 prime: str | None = None) -> None:
        self.model, self.vocab = model.eval(), vocab
        self.label_indices: list[list[int]] = []
        for symbol in label_symbols:
            known, unknown = vocab.encode_known(symbol)
            self.label_indices.append(known if not unknown and symbol else [])
        if prime is None:
            prime = "\n" if vocab.encode_known("\n")[1] == 0 else ""
        self.prime = vocab.encode(prime, what="LM prime") if prime else []

    @torch.no_grad()
    def _advance(self, indices: list[int], recurrent: Any) -> _LMState:
        logits, recurrent = self.model(torch.tensor(indices).unsqueeze(1), recurrent)  # (T, 1, V)
        return _LMState(recurrent, logits[-1, 0].double().log_softmax(-1))

    def initial_state(self) -> _LMState:
        if not self.prime:
            uniform = torch.full((len(self.vocab),), -torch.log(torch.tensor(len(self.vocab),
                                                                               dtype=torch.float64)))
            return _LMState(None, uniform)
        return self._advance(self.prime, None)

    def score(self, state: _LMState, label: int) -> tuple[float, _LMState]:
        indices = self.label_indices[label]
        if not indices:
            raise ValueError(f"CTC label {label} has no symbol in the language model's vocabulary")
        total, current = 0.0, state
        for index in indices:  # a label may spell several LM symbols
            total += float(current.log_probs[index])
            current = self._advance([index], current.recurrent)
        return total, current
