"""The translation pipeline: sentences in, translations with the model's score out (greedy or
beam); BLEU and exact match of a parallel corpus."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rnnkit.data.text import UNK, read_parallel, read_tsv_pairs
from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.tasks import translate


@dataclass
class Translation(Result):
    source: str
    translation: str
    log_prob: float  # log P(translation + </s> | source) under the model
    per_token: float  # log_prob / (output tokens + 1): comparable across lengths
    unknown: list[str]  # source symbols the model never saw in training (read as <unk>)
    finished: bool  # ended with </s> (False: stopped at the length limit)

    def __str__(self) -> str:
        return self.translation


class TranslatePipeline(Pipeline):
    """Input: a source sentence, as typed. Result: :class:`Translation`. Option: ``beam`` width
    (1: greedy). Text unlike the training data still gets an answer: a low ``per_token`` score
    or ``unknown`` symbols tell the caller so."""

    task = translate.NAME
    options: ClassVar[dict[str, Any]] = {"beam": 1}

    def _load(self) -> nn.Module:
        self.translator, _ = translate.load_model(self.checkpoint)
        return self.translator.model

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        beam = int(options["beam"])
        if beam < 1:
            raise ValueError(f"beam must be at least 1, got {beam}")
        t = self.translator
        sources: list[list[str]] = []
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise InputError(f"input {first_index + i + 1} ({shown(text)}): give a sentence")
            symbols = t.symbols(text)
            if not symbols:
                raise InputError(f"input {first_index + i + 1} is empty: give a sentence")
            sources.append(symbols)
        ids = [t.source_vocab.encode(s) for s in sources]
        source = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in ids],
                                                 padding_value=t.source_vocab.pad).to(self.device)
        lengths = torch.tensor([len(x) for x in ids])
        limits = [int(t.data.max_decode_ratio * len(x)) + 10 for x in ids]
        outputs: list[tuple[list[int], float, bool]] = []
        if beam == 1:
            # one limit for the batch, from its longest source, as validation decodes
            decoded = t.model.greedy(source, lengths, max_length=max(limits))
            for tokens, log_prob in zip(decoded.tokens, decoded.log_probs):
                outputs.append((tokens, log_prob, len(tokens) < max(limits)))
        else:
            for b, limit in enumerate(limits):
                best = t.model.beam(source[:, b:b + 1], lengths[b:b + 1], beam, max_length=limit)[0][0]
                outputs.append((best.tokens, best.log_prob, best.finished))
        results: list[Result] = []
        for text, symbols, (tokens, log_prob, finished) in zip(batch, sources, outputs):
            unknown = [s for s in symbols if s not in t.source_vocab or s == UNK]
            results.append(Translation(
                text, translate.detokenize(t.target_vocab.decode(tokens), t.data.char_level),
                float(log_prob), float(log_prob) / (len(tokens) + 1), unknown, bool(finished)))
        return results

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """Teacher-forced loss, exact match and corpus BLEU (greedy) of a parallel corpus: a TSV
        file of ``source<TAB>target`` lines, or line-aligned files ``PATH.<source language>`` and
        ``PATH.<target language>`` (Multi30k's ``val`` → ``val.de`` + ``val.en``)."""
        t = self.translator
        data = t.data
        path = Path(path)
        pair = [path.with_name(f"{path.name}.{lang}")
                for lang in (data.source_language, data.target_language)]
        if not path.is_file() and all(p.is_file() for p in pair):
            pairs, _ = read_parallel(*pair, lowercase=data.source == "multi30k" or data.lowercase)
        else:
            pairs, _ = read_tsv_pairs(path, lowercase=data.source == "multi30k" or data.lowercase)
        if data.char_level:  # whitespace-tokenised text back to characters, as training read it
            pairs = [(list(" ".join(s)), list(" ".join(r))) for s, r in pairs]
        if batch_size:
            data = translate.TranslateDataConfig(**{**self.described["data"],
                                                    "eval_batch_size": batch_size})
        sources = [t.source_vocab.encode(s) for s, _ in pairs]
        targets = [t.target_vocab.encode(r, eos=True) for _, r in pairs]
        outputs, loss = translate.translate_encoded(t.model, sources, targets, t.target_vocab, data)
        exact, bleu = translate.score_outputs(outputs, [r for _, r in pairs], data.char_level)
        return {"loss": loss, "exact": exact, "bleu": bleu.score, "examples": float(len(pairs))}

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        return (f"BLEU {metrics['bleu']:.2f}, exact match {100 * metrics['exact']:.2f}%, loss "
                f"{metrics['loss']:.4f} nats/token, perplexity {math.exp(metrics['loss']):.2f} "
                f"({int(metrics['examples'])} sentence pairs)")
