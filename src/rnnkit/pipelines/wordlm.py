"""The word LM's pipeline: primes in, generated words out; perplexity of a PTB-style text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from rnnkit.data.streams import batchify, evaluation_rows
from rnnkit.data.text import UNK, tokenize_text
from rnnkit.models.language_model import continue_streams, seeded_generator
from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.tasks import wordlm

NUMBER = "N"
NUMERAL = re.compile(r"[+-]?[\d.,/:]*\d[\d.,/:]*")


@dataclass
class GeneratedWords(Result):
    prime: str
    words: list[str]  # the prime's tokens (as the model read them) and the sampled words
    text: str  # the words joined by spaces, each <eos> as a line break

    def __str__(self) -> str:
        return self.text


class WordLMPipeline(Pipeline):
    """Input: a prime sentence (tokenised as the corpus is, numbers as PTB's ``N``; words outside
    the vocabulary read as ``<unk>``; "" starts a new sentence). Result: :class:`GeneratedWords`.
    Options: ``length`` words, ``temperature``, ``top_k``, ``seed``."""

    task = wordlm.NAME
    options: ClassVar[dict[str, Any]] = {"length": 30, "temperature": 1.0, "top_k": None, "seed": None}

    def _load(self) -> nn.Module:
        model, self.vocab, _ = wordlm.load_model(self.checkpoint)
        return model

    def tokens(self, text: str) -> list[str]:
        tokens = tokenize_text(text, self.vocab)
        if NUMBER in self.vocab:  # Mikolov's PTB writes every number as "N"
            tokens = [NUMBER if t not in self.vocab and NUMERAL.fullmatch(t) else t for t in tokens]
        if UNK not in self.vocab:
            unknown = [t for t in tokens if t not in self.vocab]
            if unknown:
                raise InputError(f"input {shown(text)}: {unknown[0]!r} is not in the model's "
                                 f"vocabulary of {len(self.vocab)} words (which has no <unk>)")
        return tokens

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        primes = []
        for i, prime in enumerate(batch):
            if not isinstance(prime, str):
                raise InputError(f"input {first_index + i + 1} ({shown(prime)}): give a string")
            primes.append(self.tokens(prime))
        ids = [self.vocab.encode(tokens or [wordlm.EOS]) for tokens in primes]
        seed = options["seed"]
        # input i samples from seed + i: what it draws depends on its place, not its neighbours
        generators = [seeded_generator(None if seed is None else seed + first_index + i)
                      for i in range(len(ids))]
        out = continue_streams(self.module, ids, int(options["length"]), float(options["temperature"]),
                               options["top_k"], generators)  # type: ignore[arg-type]
        results: list[Result] = []
        for prime, tokens, symbols in zip(batch, primes, out):
            read = [token if token in self.vocab else UNK for token in tokens]
            words = [*read, *self.vocab.decode(symbols, strip_specials=False)]
            text = " ".join(words).replace(f" {wordlm.EOS} ", "\n").replace(wordlm.EOS, "\n")
            results.append(GeneratedWords(prime, words, text.strip()))
        return results

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """Cross-entropy per word and perplexity of a PTB-style file (a sentence per line,
        ``<eos>`` after each), laid out in rows as validation lays out its text."""
        data = wordlm.WordLMDataConfig(**self.described["data"])
        words, _ = wordlm.read_words(Path(path))
        stream = wordlm.encode(self.vocab, words, f"text {path}")
        rows = evaluation_rows(stream.numel(), data.seq_len, batch_size or data.eval_batch_size)
        metrics = wordlm.stream_metrics(self.module, batchify(stream, rows), data.seq_len)
        unknown = sum(word not in self.vocab for word in words)
        return {**metrics, "words": float(stream.numel()), "unknown": float(unknown)}

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        count = f" ({int(metrics['words']):,} words)" if "words" in metrics else ""
        return f"perplexity {metrics['ppl']:.2f}, {metrics['loss']:.4f} nats/word{count}"
