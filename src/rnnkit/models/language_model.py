"""A recurrent language model: symbol → (embedding | one-hot) → stacked rnnkit layers → softmax.

Shapes: tokens (T, B) → logits (T, B, V); the state is whatever the rnnkit layer carries
(``h`` or ``(h, c)``, each (layers, B, H)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.data.vocab import CharVocab
from rnnkit.models.recurrent import (
    CELLS,
    RecurrentConfig,
    build_recurrent,
    cell_option,
    cell_options_of,
    check_chrono,
    check_orthogonal,
    check_regularisers,
    regularisers_of,
)
from rnnkit.options import Options, option


@dataclass
class LMConfig(Options):
    """Everything needed to rebuild the model; stored in every checkpoint."""

    vocab_size: int = option(0, "symbols in the vocabulary (derived from the data)", ge=0)
    cell: str = option("lstm", "recurrent cell", choices=CELLS)
    layers: int = option(2, "stacked recurrent layers", ge=1)
    hidden: int = option(256, "hidden units per layer", ge=1)
    embedding: int = option(64, "embedding size; 0 for one-hot inputs", ge=0)
    dropout: float = option(0.0, "dropout on embeddings, between layers and on outputs", ge=0,
                            lt=1)
    peephole: bool = cell_option("peephole")
    coupled: bool = cell_option("coupled")
    reset: str = cell_option("reset")
    nonlinearity: str = cell_option("nonlinearity")
    orthogonal: str | None = cell_option("orthogonal")
    forget_bias: float | None = cell_option("forget_bias")
    chrono: float | None = cell_option("chrono")
    kernel_size: int = cell_option("kernel_size")
    recurrent_dropout: float = cell_option("recurrent_dropout")
    input_dropout: float = cell_option("input_dropout")
    zoneout: float = cell_option("zoneout")
    zoneout_cell: float | None = cell_option("zoneout_cell")
    weight_drop: float = cell_option("weight_drop")
    layer_norm: bool = cell_option("layer_norm")
    tie_weights: bool = option(False, "the output layer shares the embedding matrix (Press & "
                                      "Wolf 2017, Inan et al. 2017); needs embedding = hidden")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.peephole or self.coupled) and self.cell != "lstm":
            raise ValueError("--peephole and --coupled are LSTM options")
        check_regularisers(self.cell, regularisers_of(self))
        check_chrono(self.cell, self.chrono, self.forget_bias)
        check_orthogonal(self.cell, self.orthogonal)
        if self.layer_norm and self.cell not in ("lstm", "gru"):
            raise ValueError(f"--layer-norm is an LSTM and GRU option, not one of cell={self.cell}")
        if self.layer_norm and (self.recurrent_dropout or self.zoneout or self.zoneout_cell):
            raise ValueError("recurrent_dropout and zoneout are not implemented with --layer-norm")
        if self.tie_weights and self.embedding != self.hidden:
            # the decoder maps the last layer's h (hidden) to logits with the (V, E) embedding
            raise ValueError(f"--tie-weights needs the embedding size equal to the last layer's "
                             f"hidden size, got embedding={self.embedding} and hidden={self.hidden}")


def one_hot(tokens: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot(tokens, classes).to(dtype)`` as rows of an identity matrix: one gather in
    ``dtype`` instead of an int64 scatter and a conversion (half the time at T·B = 32,640). A
    symbol outside [0, classes) raises in ``index_select`` (no Python check on the values here:
    it would stop torch.export, which cannot branch on data)."""
    identity = torch.eye(classes, dtype=dtype, device=tokens.device)
    return identity.index_select(0, tokens.reshape(-1)).view(*tokens.shape, classes)


class TiedDecoder(nn.Module):
    """The output layer of a tied model: logits = h · Eᵀ + b with E the embedding's (V, E) matrix.

    The embedding is held by reference, not registered: the model's ``state_dict`` (and so a
    checkpoint) holds the shared matrix once, as ``embedding.weight``, plus ``decoder.bias``;
    safetensors refuses two names for one storage. ``weight`` reads as nn.Linear's does.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._shared = (embedding,)  # a tuple: nn.Module does not register what is inside
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    @property
    def weight(self) -> Tensor:
        return self._shared[0].weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class LanguageModel(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        vocab, hidden = config.vocab_size, config.hidden
        if vocab <= 0:
            raise ValueError("vocab_size must be positive")
        self.embedding = nn.Embedding(vocab, config.embedding) if config.embedding else None
        input_size = config.embedding or vocab
        # dropout between stacked layers is the layer's; around the stack it is ours
        self.rnn = build_recurrent(RecurrentConfig(
            cell=config.cell, layers=config.layers, hidden=hidden, dropout=config.dropout,
            **cell_options_of(config),
        ), input_size)
        self.drop = nn.Dropout(config.dropout)
        self.decoder: nn.Module
        if config.tie_weights and self.embedding is not None:  # LMConfig checked the sizes
            self.decoder = TiedDecoder(self.embedding)
        else:
            self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """tokens (T, B) int64 → logits (T, B, V), final state."""
        output, state = self.features(tokens, state)
        return self.decoder(output), state  # (T, B, V)

    def features(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """tokens (T, B) int64 → what the output layer reads (T, B, H), final state: for a loss
        that applies ``decoder.weight`` and ``decoder.bias`` itself (linear_cross_entropy)."""
        if self.embedding is not None:
            x = self.drop(self.embedding(tokens))  # (T, B, E)
        else:
            x = one_hot(tokens, self.config.vocab_size, self.decoder.weight.dtype)  # (T, B, V)
        output, state = self.rnn(x, state)  # (T, B, H)
        return self.drop(output), state


def _pick(logits: Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> int:
    """One symbol from logits (V,): argmax at temperature 0, else softmax(logits / T) over top k."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.double(), dim=-1)  # double: tiny probabilities stay nonzero
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def continue_streams(model: LanguageModel, primes: list[list[int]], length: int,
                     temperature: float = 1.0, top_k: int | None = None,
                     generators: list[torch.Generator] | None = None) -> list[list[int]]:
    """``length`` sampled symbols after each prime (non-empty id lists).

    Each prime is read once; then every stream advances one symbol per step, all streams in one
    batched call, each from its own carried state (:class:`~rnnkit.streaming.StreamBank`).
    Stream i draws from ``generators[i]``, so what it samples does not depend on its neighbours.
    """
    from rnnkit.streaming import StreamBank

    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    was_training = model.training
    model.eval()
    try:
        bank = StreamBank(model)
        keys = [bank.add() for _ in primes]
        device = model.decoder.weight.device
        # logits come back to the CPU, where the generators draw
        last = [bank.step([key], torch.tensor(prime, device=device).unsqueeze(1))[-1, 0].cpu()
                for key, prime in zip(keys, primes)]  # (V,) after each prime
        out: list[list[int]] = [[] for _ in primes]
        for step in range(length):
            symbols = [_pick(logits, temperature, top_k, generators[i] if generators else None)
                       for i, logits in enumerate(last)]
            for row, symbol in zip(out, symbols):
                row.append(symbol)
            if step + 1 < length:
                last = list(bank.step(keys, torch.tensor([symbols], device=device))[0].cpu())  # (B, V)
    finally:
        model.train(was_training)
    return out


def prime_ids(vocab: CharVocab, prime: str, what: str = "prime") -> list[int]:
    """The symbols generation starts from: the prime's, or after a newline for an empty prime
    (the first symbol when the vocabulary has no newline); an unknown symbol raises naming it."""
    start = prime or ("\n" if "\n" in vocab.symbols or 10 in vocab.symbols else "")
    return vocab.encode(start, what=what) if start else [0]


def seeded_generator(seed: int | None) -> torch.Generator:
    """A generator seeded with ``seed`` (a fresh random seed when None)."""
    return torch.Generator().manual_seed(seed if seed is not None else torch.seed())


@torch.no_grad()
def generate(
    model: LanguageModel,
    vocab: CharVocab,
    prime: str = "",
    length: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """The prime followed by ``length`` sampled symbols; same seed, same text.

    An empty prime starts after a newline (or the first symbol when there is no newline).
    """
    indices = prime_ids(vocab, prime)
    out = continue_streams(model, [indices], length, temperature, top_k, [seeded_generator(seed)])
    return prime + vocab.decode(out[0])
