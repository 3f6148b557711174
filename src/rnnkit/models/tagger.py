"""Many-to-many with Tx = Ty: one tag per token (NER, POS, slot filling), optionally + an intent.

    tokens (T, B) ─embedding─► (T, B, E) ┐
    characters of each word (T, B, W) ─char BiRNN─► (T, B, 2·Hc) ┴─concat─► BiRNN ─► (T, B, D·H)
        ─linear─► emissions (T, B, K) ─► softmax per token, or a linear-chain CRF over the sentence
        └─pool─► linear ─► intent logits (B, I)        (joint slot filling + intent, e.g. ATIS)

The character BiRNN (:mod:`rnnkit.models.char_words`, Lample et al. 2016) gives rare and unseen
words a representation from their spelling, concatenated to the word embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.models.char_words import char_words_of
from rnnkit.models.classifier import POOLINGS, pool, valid_mask
from rnnkit.models.crf import LinearChainCRF
from rnnkit.models.recurrent import RecurrentConfig, build_recurrent
from rnnkit.options import Options, option


@dataclass
class TaggerConfig(Options):
    """Everything needed to rebuild a :class:`Tagger`; JSON-able via ``to_dict``."""

    vocab_size: int = option(0, "words in the vocabulary (derived from the data)", ge=0)
    tags: int = option(0, "tags (derived from the data)", ge=0)
    embedding: int = option(64, "word embedding size", ge=1)
    pad: int = option(0, "padding id of words (and of characters)", ge=0)
    crf: bool = option(False, "a linear-chain CRF over the tags instead of a softmax per token")
    chars: int = option(0, "character vocabulary size; 0: no character features", ge=0)
    char_embedding: int = option(16, "character embedding size", ge=1)
    char_hidden: int = option(16, "character BiRNN hidden units per direction", ge=1)
    intents: int = option(0, "intent classes (derived from the data); 0: no intent head", ge=0)
    intent_pooling: str = option("final", "how the outputs become the intent's vector",
                                 choices=POOLINGS)
    intent_weight: float = option(1.0, "loss = tag loss + intent_weight · intent loss", ge=0)
    dropout: float = option(0.0, "dropout on the embeddings and the outputs", ge=0, lt=1)
    recurrent: RecurrentConfig = option(
        help="the recurrent stack",
        factory=lambda: RecurrentConfig(layers=1, hidden=64, bidirectional=True))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size <= 0 or self.tags <= 0:
            raise ValueError(f"vocab_size and tags must be positive, got {self.vocab_size}, {self.tags}")


@dataclass
class TaggerOutput:
    emissions: Tensor  # (T, B, K) per-token tag scores
    mask: Tensor  # (T, B) bool, True on real tokens
    intent_logits: Tensor | None  # (B, I) or None


class Tagger(nn.Module):
    def __init__(self, config: TaggerConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding, padding_idx=config.pad)
        word_size = config.embedding
        self.char_words = char_words_of(config)
        if self.char_words is not None:
            word_size += self.char_words.output_size
        self.rnn = build_recurrent(config.recurrent, word_size)
        self.drop = nn.Dropout(config.dropout)
        self.emit = nn.Linear(config.recurrent.output_size, config.tags)
        self.crf = LinearChainCRF(config.tags) if config.crf else None
        self.intent = nn.Linear(config.recurrent.output_size, config.intents) if config.intents else None

    def forward(self, tokens: Tensor, lengths: Tensor, chars: Tensor | None = None,
                char_lengths: Tensor | None = None) -> TaggerOutput:
        """tokens (T, B), lengths (B,) [, chars (T, B, W), char_lengths (T, B)] → emissions etc."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        mask = valid_mask(lengths.to(tokens.device), tokens.shape[0])  # (T, B)
        x = self.embedding(tokens)  # (T, B, E)
        if self.char_words is not None:
            if chars is None or char_lengths is None:
                raise ValueError("this tagger uses character features: pass chars and char_lengths")
            x = torch.cat((x, self.char_words(chars, char_lengths, mask)), dim=2)  # (T, B, E+2Hc)
        outputs, state = self.rnn(self.drop(x), lengths=lengths)  # (T, B, D·H)
        emissions = self.emit(self.drop(outputs))  # (T, B, K)
        intent = None
        if self.intent is not None:
            pooled = pool(outputs, state, lengths, self.config.intent_pooling,
                          self.config.recurrent.bidirectional)  # (B, D·H)
            intent = self.intent(self.drop(pooled))  # (B, I)
        return TaggerOutput(emissions, mask, intent)

    def loss(self, tokens: Tensor, lengths: Tensor, tags: Tensor, chars: Tensor | None = None,
             char_lengths: Tensor | None = None, intents: Tensor | None = None) -> Tensor:
        """Per-token tag loss (CRF NLL or cross-entropy) + intent_weight · intent cross-entropy.

        ``tags`` (T, B) may hold anything at padding positions; they are masked out.
        """
        out = self(tokens, lengths, chars, char_lengths)
        if self.crf is not None:
            # padding positions must still index a valid tag for the gather in score()
            safe_tags = tags.masked_fill(~out.mask, 0)
            loss = self.crf.loss(out.emissions, safe_tags, out.mask)
        else:
            loss = F.cross_entropy(out.emissions[out.mask], tags[out.mask])
        if out.intent_logits is not None:
            if intents is None:
                raise ValueError("this tagger has an intent head: pass intents (B,)")
            loss = loss + self.config.intent_weight * F.cross_entropy(out.intent_logits, intents)
        return loss

    @torch.no_grad()
    def decode(self, tokens: Tensor, lengths: Tensor, chars: Tensor | None = None,
               char_lengths: Tensor | None = None) -> tuple[list[list[int]], list[int] | None]:
        """Best tags per sentence (lists of each sentence's length; Viterbi with a CRF, else
        per-token argmax) and the predicted intents (None without an intent head)."""
        out = self(tokens, lengths, chars, char_lengths)
        if self.crf is not None:
            tags, _ = self.crf.decode(out.emissions, out.mask)
        else:
            best = out.emissions.argmax(-1).t().tolist()  # (B, T)
            tags = [row[: int(n)] for row, n in zip(best, out.mask.sum(0).tolist())]
        intents = out.intent_logits.argmax(-1).tolist() if out.intent_logits is not None else None
        return tags, intents
