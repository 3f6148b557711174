"""The sentiment pipeline: sentences in, label names and probabilities out; scores of a TSV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rnnkit.data.text import read_labelled_tsv, unescape_ptb
from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.tasks import sentiment


@dataclass
class Classification(Result):
    text: str
    tokens: list[str]  # as the model read them
    label: str  # the likeliest class, by name
    probability: float
    probabilities: dict[str, float]  # every class by name
    unknown: list[str]  # words the model never saw in training (read as <unk>, as training did)

    def __str__(self) -> str:
        return f"{self.label} ({self.probability:.3f})  {self.text}"


class SentimentPipeline(Pipeline):
    """Input: a sentence, as typed ("I loved it!" is read as i / loved / it / !).
    Result: :class:`Classification` with labels by name (negative / positive)."""

    task = sentiment.NAME

    def _load(self) -> nn.Module:
        model, self.encoder, self.labels, _ = sentiment.load_model(self.checkpoint)
        return model

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        encoded, tokens_of = [], []
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise InputError(f"input {first_index + i + 1} ({shown(text)}): give a sentence")
            tokens = self.encoder.tokens(text)
            if not tokens:
                raise InputError(f"input {first_index + i + 1} is empty: give a sentence")
            tokens_of.append(tokens)
            encoded.append(self.encoder.encode(tokens))
        probs = sentiment.probabilities(self.module, encoded, self.encoder.words.pad, len(batch))
        names = sentiment.label_names(self.labels)
        results: list[Result] = []
        for text, tokens, row in zip(batch, tokens_of, probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            unknown = [t for t in tokens if t not in self.encoder.words]
            results.append(Classification(text, tokens, names[best], row[best], dict(zip(names, row)),
                                          unknown))
        return results

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """Loss, accuracy, macro F1 and F1 per class of a TSV with a header naming a label and a
        text column (``label<TAB>sentence``, ``label<TAB>content``, ... in any order)."""
        data = sentiment.SentimentDataConfig(**self.described["data"])
        examples, _ = read_labelled_tsv(path, lowercase=self.encoder.lowercase)
        if self.encoder.unescape_ptb:
            examples = [(unescape_ptb(tokens), label) for tokens, label in examples]
        encoded, references = sentiment.encode_examples(examples, self.encoder, self.labels)
        probs = sentiment.probabilities(self.module, encoded, self.encoder.words.pad,
                                        batch_size or data.eval_batch_size)
        references, predictions, loss = sentiment.predictions_from(probs, references)
        metrics = sentiment.classification_metrics(references, predictions, self.labels)
        return {"loss": loss, **metrics, "examples": float(len(references))}

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        f1 = ", ".join(f"F1 {name} {metrics['f1_' + name]:.3f}"
                       for name in sentiment.label_names(self.labels))
        return (f"accuracy {100 * metrics['accuracy']:.2f}%, {f1}, macro F1 "
                f"{metrics['macro_f1']:.3f}, loss {metrics['loss']:.4f} "
                f"({int(metrics['examples'])} sentences)")
