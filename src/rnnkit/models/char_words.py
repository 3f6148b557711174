"""Word vectors from spelling: a character BiRNN per word (Lample et al. 2016).

    characters of each word (T, B, W) ─char embedding─► ─BiRNN─► final states (T, B, 2·Hc)

The forward final state (after the last character) and the backward final state (after the
first) are concatenated. Concatenated to a word embedding they give rare and unseen words —
which a word embedding maps to one shared ``<unk>`` vector — a representation of their own:
"warmly" looks like "warm", "underwritten" like "written". Used by the tagger and the classifier.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from rnnkit.models.recurrent import RecurrentConfig, build_recurrent, final_hidden


class CharWordEncoder(nn.Module):
    """Characters (T, B, W) with word lengths (T, B) → (T, B, 2·hidden), zero at padding words."""

    def __init__(self, chars: int, embedding: int, hidden: int, cell: str = "lstm", pad: int = 0) -> None:
        super().__init__()
        if chars <= 0:
            raise ValueError(f"the character vocabulary must not be empty, got {chars}")
        self.embedding = nn.Embedding(chars, embedding, padding_idx=pad)
        self.rnn = build_recurrent(
            RecurrentConfig(cell=cell, layers=1, hidden=hidden, bidirectional=True), embedding)
        self.output_size = 2 * hidden

    def forward(self, chars: Tensor, char_lengths: Tensor, mask: Tensor) -> Tensor:
        """``mask`` (T, B) is True on real words; only those are run (no work on padding)."""
        steps, batch, _ = chars.shape
        flat_mask = mask.reshape(-1)  # (T·B,)
        words = chars.reshape(steps * batch, -1)[flat_mask]  # (N, W)
        lengths = char_lengths.reshape(-1)[flat_mask].cpu()  # (N,)
        if bool((lengths < 1).any()):
            raise ValueError("every real word needs at least one character (char_lengths ≥ 1)")
        words = words[:, : int(lengths.max())]  # (N, W')
        x = self.embedding(words.t())  # (W', N, Ec)
        _, state = self.rnn(x, lengths=lengths)
        features = final_hidden(state, bidirectional=True)  # (N, 2·Hc)
        out = features.new_zeros(steps * batch, features.shape[1])
        out[flat_mask] = features
        return out.view(steps, batch, -1)  # (T, B, 2·Hc)


def char_words_of(config: Any) -> CharWordEncoder | None:
    """The encoder a model config asks for (``chars`` > 0: the character vocabulary size, with
    ``char_embedding``, ``char_hidden``, ``recurrent.cell`` and ``pad``), or None."""
    if not config.chars:
        return None
    return CharWordEncoder(config.chars, config.char_embedding, config.char_hidden,
                           config.recurrent.cell, config.pad)
