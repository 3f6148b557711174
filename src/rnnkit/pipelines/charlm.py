"""The character LM's pipeline: primes in, generated text out; nats and bits per char of a text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from rnnkit.data.corpus import read_files
from rnnkit.data.vocab import UnknownSymbolError
from rnnkit.models.language_model import continue_streams, prime_ids, seeded_generator
from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.tasks import charlm


@dataclass
class Generated(Result):
    prime: str
    text: str  # the prime and its continuation

    def __str__(self) -> str:
        return self.text


class CharLMPipeline(Pipeline):
    """Input: a prime (any text of the model's symbols; "" starts after a newline).
    Result: :class:`Generated`. Options: ``length`` symbols, ``temperature`` (0: the likeliest
    symbol), ``top_k``, ``seed`` (input i samples from its own generator, seeded with seed + i)."""

    task = charlm.NAME
    options: ClassVar[dict[str, Any]] = {"length": 200, "temperature": 0.8, "top_k": None, "seed": None}

    def _load(self) -> nn.Module:
        model, self.vocab, _ = charlm.load_model(self.checkpoint)
        return model

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        primes, ids = [], []
        for i, prime in enumerate(batch):
            if not isinstance(prime, str):
                raise InputError(f"input {first_index + i + 1} ({shown(prime)}): the {self.task} "
                                 "model continues text; give a string")
            try:
                ids.append(prime_ids(self.vocab, prime, what=f"input {shown(prime)}"))
            except UnknownSymbolError as error:
                raise InputError(str(error)) from None
            primes.append(prime)
        seed = options["seed"]
        # input i samples from seed + i: what it draws depends on its place, not its neighbours
        generators = [seeded_generator(None if seed is None else seed + first_index + i)
                      for i in range(len(ids))]
        out = continue_streams(self.module, ids, int(options["length"]), float(options["temperature"]),
                               options["top_k"], generators)  # type: ignore[arg-type]
        return [Generated(prime, prime + self.vocab.decode(symbols))
                for prime, symbols in zip(primes, out)]

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """Nats and bits per symbol of a text file (or every file of a folder), laid out as
        validation lays out its text; symbols outside the vocabulary are left out and counted."""
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        data = charlm.DataConfig(**self.described["data"])
        return charlm.evaluate_text(self.module, self.vocab, read_files([str(f) for f in files]),
                                    seq_len=data.seq_len, batch_size=batch_size or data.eval_batch_size,
                                    skip_unknown=True)  # type: ignore[arg-type]

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        unit = "byte" if self.vocab.byte_level else "char"
        skipped = int(metrics.get("unknown", 0))
        note = f"; {skipped:,} symbols outside the vocabulary left out" if skipped else ""
        count = f" ({int(metrics['symbols']):,} symbols{note})" if "symbols" in metrics else ""
        return f"{metrics['loss']:.4f} nats/{unit}  {metrics['bpc']:.4f} bits/{unit}{count}"
