"""Many-to-one: a sequence in, one label out (sentiment, parity, intent; images read row by row).

    tokens (T, B) ─embedding─► (T, B, E) ─(bi)RNN─► (T, B, D·H) ─pool─► (B, D·H) ─linear─► (B, C)

Optionally (``chars > 0``) each word's spelling, read by a character BiRNN
(:mod:`rnnkit.models.char_words`), is concatenated to its embedding: words never seen in
training otherwise all share the ``<unk>`` vector.

Pooling looks only at each sequence's valid steps: ``final`` is the last layer's final state
(both directions concatenated when bidirectional: the forward state after the last real token
and the backward state after the first), ``mean`` and ``max`` run over the real outputs.

With ``embedding = 0`` the inputs are feature vectors (T, B, ``input_size``) instead of token ids:
that is the row-by-row image reader (:func:`image_rows`), the one-to-one baseline in which each
image row is one time step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.models.char_words import char_words_of
from rnnkit.models.recurrent import RecurrentConfig, build_recurrent, final_hidden
from rnnkit.options import Options, option

POOLINGS = ("final", "mean", "max")


@dataclass
class ClassifierConfig(Options):
    """Everything needed to rebuild a :class:`SequenceClassifier`; JSON-able via ``to_dict``."""

    classes: int = option(2, "output classes (derived from the data)", ge=1)
    vocab_size: int = option(0, "token ids in (derived from the data); 0 with embedding 0: "
                                "feature vectors in", ge=0)
    embedding: int = option(64, "word embedding size; 0: inputs are float feature vectors", ge=0)
    input_size: int = option(0, "feature size when embedding is 0", ge=0)
    pooling: str = option("final", "how the outputs become one vector: the final state, or the "
                                   "mean or max over the real steps", choices=POOLINGS)
    dropout: float = option(0.0, "dropout on the embeddings and on the pooled vector", ge=0, lt=1)
    pad: int = option(0, "embedding row kept at zero (words and characters)", ge=0)
    chars: int = option(0, "character vocabulary size; 0: no character features", ge=0)
    char_embedding: int = option(16, "character embedding size", ge=1)
    char_hidden: int = option(32, "character BiRNN hidden units per direction", ge=1)
    recurrent: RecurrentConfig = option(help="the recurrent stack",
                                        factory=lambda: RecurrentConfig(layers=1, hidden=64))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding and self.vocab_size <= 0:
            raise ValueError("an embedding needs vocab_size > 0")
        if self.chars and not self.embedding:
            raise ValueError("character features need token inputs (an embedding)")
        if not self.embedding and self.input_size <= 0:
            raise ValueError("without an embedding (feature inputs) input_size must be positive")


def valid_mask(lengths: Tensor, steps: int) -> Tensor:
    """(T, B) bool, True where t < lengths[b]."""
    return torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


def pool(outputs: Tensor, state: Any, lengths: Tensor, mode: str, bidirectional: bool) -> Tensor:
    """One vector per sequence from a layer's outputs (T, B, F) and final state: (B, F)."""
    if mode == "final":
        return final_hidden(state, bidirectional)
    mask = valid_mask(lengths.to(outputs.device), outputs.shape[0]).unsqueeze(2)  # (T, B, 1)
    if mode == "mean":
        return (outputs * mask).sum(0) / lengths.to(outputs.device, outputs.dtype).unsqueeze(1)
    if mode == "max":
        return outputs.masked_fill(~mask, float("-inf")).max(0).values
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {mode!r}")


def _lengths(inputs: Tensor, lengths: Tensor | None) -> Tensor:
    if lengths is None:
        return torch.full((inputs.shape[1],), inputs.shape[0], dtype=torch.int64)
    return torch.as_tensor(lengths, dtype=torch.int64)


class SequenceClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        if config.embedding:
            self.embedding: nn.Embedding | None = nn.Embedding(
                config.vocab_size, config.embedding, padding_idx=config.pad)
        else:
            self.embedding = None
        input_size = config.embedding or config.input_size
        self.char_words = char_words_of(config)
        if self.char_words is not None:
            input_size += self.char_words.output_size
        self.rnn = build_recurrent(config.recurrent, input_size)
        self.drop = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.recurrent.output_size, config.classes)

    def encode(self, inputs: Tensor, lengths: Tensor | None = None, chars: Tensor | None = None,
               char_lengths: Tensor | None = None) -> Tensor:
        """The pooled sequence vector (B, D·H)."""
        lengths = _lengths(inputs, lengths)
        if self.embedding is None:
            x = inputs  # (T, B, I) features
        else:
            x = self.embedding(inputs)  # (T, B, E)
            if self.char_words is not None:
                if chars is None or char_lengths is None:
                    raise ValueError("this classifier uses character features: pass chars and "
                                     "char_lengths")
                mask = valid_mask(lengths.to(inputs.device), inputs.shape[0])  # (T, B)
                x = torch.cat((x, self.char_words(chars, char_lengths, mask)), dim=2)  # (T, B, E+2Hc)
            x = self.drop(x)
        outputs, state = self.rnn(x, lengths=lengths)  # (T, B, D·H)
        return pool(outputs, state, lengths, self.config.pooling, self.config.recurrent.bidirectional)

    def forward(self, inputs: Tensor, lengths: Tensor | None = None, chars: Tensor | None = None,
                char_lengths: Tensor | None = None) -> Tensor:
        """inputs (T, B) ids or (T, B, I) features, lengths (B,) [, chars (T, B, W),
        char_lengths (T, B)] → logits (B, C)."""
        return self.output(self.drop(self.encode(inputs, lengths, chars, char_lengths)))

    def loss(self, inputs: Tensor, lengths: Tensor | None, labels: Tensor, chars: Tensor | None = None,
             char_lengths: Tensor | None = None) -> Tensor:
        """Mean cross-entropy over the batch."""
        return F.cross_entropy(self(inputs, lengths, chars, char_lengths), labels)

    @torch.no_grad()
    def predict(self, inputs: Tensor, lengths: Tensor | None = None, chars: Tensor | None = None,
                char_lengths: Tensor | None = None) -> Tensor:
        """The most likely class per sequence (B,)."""
        return self(inputs, lengths, chars, char_lengths).argmax(-1)


# --- row-by-row image reader ------------------------------------------------------------------


def image_rows(images: Tensor) -> Tensor:
    """Images (B, H, W) → a time-major sequence of rows (H, B, W): row i is time step i."""
    if images.dim() != 3:
        raise ValueError(f"images must be (B, H, W), got shape {tuple(images.shape)}")
    return images.transpose(0, 1).contiguous()


def row_reader_config(
    width: int, classes: int, recurrent: RecurrentConfig | None = None, pooling: str = "final"
) -> ClassifierConfig:
    """A classifier over image rows: feature inputs of ``width`` pixels, no embedding."""
    return ClassifierConfig(classes=classes, embedding=0, input_size=width, pooling=pooling,
                            recurrent=recurrent or RecurrentConfig(layers=1, hidden=128))
