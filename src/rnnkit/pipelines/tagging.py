"""The tagging pipeline: sentences in, tagged tokens with entity spans and the intent out;
slot F1 and intent accuracy of an ATIS folder or a CoNLL file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rnnkit.data.conll import detect_format
from rnnkit.data.text import tokenize_text
from rnnkit.metrics.entities import get_entities
from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.tasks import tagging

TYPE_SEPARATOR = "/"  # "slot_f1/PER": a metric of one entity type
TYPES_SHOWN = 10  # entity types listed one by one in the printed line


@dataclass
class Entity:
    type: str
    start: int  # first token
    end: int  # last token (inclusive, as seqeval counts)
    text: str


@dataclass
class Tagged(Result):
    text: str
    tokens: list[str]  # as the model read them
    tags: list[str]  # one per token
    entities: list[Entity]
    intent: str | None  # None for a model without an intent head (NER)
    unknown: list[str]  # words the model never saw in training (read as <unk>, as training did)

    def __str__(self) -> str:
        text = tagging.bracketed(self.tokens, [(e.type, e.start, e.end) for e in self.entities])
        return (f"{self.intent}\t" if self.intent is not None else "") + text


class TaggingPipeline(Pipeline):
    """Input: a sentence, as typed. Result: :class:`Tagged`."""

    task = tagging.NAME

    def _load(self) -> nn.Module:
        model, self.vocab, _ = tagging.load_model(self.checkpoint)
        self.data = tagging.TaggingDataConfig(**self.described["data"])
        return model

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        examples: list[tagging.Example] = []
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise InputError(f"input {first_index + i + 1} ({shown(text)}): give a sentence")
            # words as typed: the vocabularies lower-case them for the word embedding if the
            # run did, and the characters keep their case
            # a typed "Boston" reads as the "boston" of a lower-cased corpus (ATIS); in a cased
            # one (CoNLL) it stays as typed, as evaluation reads it: the case is the tagger's cue
            tokens = tokenize_text(text, self.vocab, fold_case=self.vocab.words.uncased)
            if not tokens:
                raise InputError(f"input {first_index + i + 1} is empty: give a sentence")
            # the gold tags only feed the loss predict_split also computes; "O" is always known
            examples.append((tokens, ["O"] * len(tokens), None))
        encoded = tagging.encode(examples, self.vocab)
        tags, intents, _ = tagging.predict_split(self.module, encoded, self.vocab, len(batch))
        results: list[Result] = []
        for row, (text, (tokens, _, _)) in enumerate(zip(batch, examples)):
            entities = [Entity(kind, start, end, " ".join(tokens[start:end + 1]))
                        for kind, start, end in get_entities(tags[row])]
            results.append(Tagged(text, tokens, tags[row], entities,
                                  intents[row] if intents is not None else None,
                                  [t for t in tokens if t not in self.vocab]))
        return results

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """Slot (entity) precision / recall / F1, intent and sentence accuracy, and the loss, on
        an ATIS-style folder (seq.in, seq.out, label) or a CoNLL file (one token per line)."""
        path = Path(path)
        examples, _ = tagging.read_examples(path, detect_format(path, self.data.tag_column),
                                            self.data)
        if not examples:
            raise ValueError(f"{path} holds no sentences")
        if examples[0][2] is None and self.vocab.intents is not None:
            raise ValueError(f"{path} has no intents, but this model predicts one per sentence: "
                             "give an ATIS-style folder (seq.in, seq.out, label)")
        scores = tagging.score_split(self.module, tagging.encode(examples, self.vocab), self.vocab,
                                     batch_size or self.data.eval_batch_size)
        # per entity type as conlleval lists them: F1 and the reference count
        by_type = {f"{key}{TYPE_SEPARATOR}{kind}": value
                   for kind, row in scores.entities.by_type.items()
                   for key, value in (("slot_f1", row["f1"]), ("support", row["support"]))}
        return {**scores.metrics(), "examples": float(len(examples)), **by_type}

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        intent = (f", intent accuracy {100 * metrics['intent_acc']:.2f}%"
                  if "intent_acc" in metrics else "")
        prefix = f"slot_f1{TYPE_SEPARATOR}"
        kinds = [key[len(prefix):] for key in metrics if key.startswith(prefix)]
        # a few types (CoNLL's four) are listed; ATIS's ~80 are left to --json
        by_type = ("; F1 by type: " + ", ".join(
            f"{kind} {100 * metrics[prefix + kind]:.2f}" for kind in kinds)
            if 0 < len(kinds) <= TYPES_SHOWN else "")
        return (f"slot F1 {100 * metrics['slot_f1']:.2f} (precision "
                f"{100 * metrics['slot_precision']:.2f}, recall {100 * metrics['slot_recall']:.2f})"
                f"{intent}, sentence accuracy {100 * metrics['sentence_acc']:.2f}%, loss "
                f"{metrics['loss']:.4f} ({int(metrics['examples'])} sentences){by_type}")
