"""Sentence sentiment: a (bi)LSTM classifier over word embeddings learnt from scratch (SST-2).

Data: two TSV files with a header naming a ``label`` column and a text column (``sentence``,
``content`` or ``text`` — the shared SST-2 copy says ``sentence`` in train.tsv and ``content``
in dev.tsv). By default ``../shared/data/sst2/{train,dev}.tsv``; the dev set is the held-out
split (GLUE keeps SST-2's test labels private). Words seen fewer than ``min_freq`` times in the
training file map to ``<unk>``. With ``model.chars`` each word's spelling is read by a character
BiLSTM too — 6 % of the SST-2 dev tokens never occur in its training phrases.

Model selection without touching the dev set: SST-2's training file holds every phrase of each
training sentence's parse tree, so ``holdout`` whole training sentences are set aside together
with every phrase of three or more words taken from them (what is left cannot have seen them).
The Trainer's validation (best weights, early stopping, the plateau schedule) runs on those; the
dev set is scored once, at the end. With ``holdout = 0`` validation runs on the dev set.

Metrics: accuracy and per-class F1. Batches are length-bucketed and reshuffled each epoch from
(seed, epoch) alone.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.data.text import (
    PAD,
    UNK,
    Vocabulary,
    pad_characters,
    pad_sequences,
    read_labelled_tsv,
    tokenize_text,
    unescape_ptb,
)
from rnnkit.models.classifier import ClassifierConfig, SequenceClassifier
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.options import Kind, Options, Rule, Spec, option
from rnnkit.tasks.common import (
    EpochPlan,
    check_size,
    confusion_matrix,
    device_of,
    f1_from_counts,
    from_meta,
    load_task_model,
    on_device,
    per_sequence,
    require_full_bptt,
    shared_path,
)
from rnnkit.train.checkpoint import Checkpoint, CheckpointError
from rnnkit.train.config import TrainConfig
from rnnkit.train.distributed import shard_span
from rnnkit.train.task import Batch, StepResult

NAME = "sentiment"
LABEL_NAMES = {"0": "negative", "1": "positive"}  # SST-2's labels, for reports
EXAMPLES = 5  # predictions a finished run shows


@dataclass
class SentimentDataConfig(Options):
    train: str | None = option(None, "training TSV, sentence<TAB>label (none: "
                                     "../shared/data/sst2/train.tsv)", metavar="PATH")
    valid: str | None = option(None, "validation TSV (none: ../shared/data/sst2/dev.tsv)",
                               metavar="PATH")
    lowercase: bool = option(True, "lower-case the text")
    unescape_ptb: bool = option(True, "'-lrb-' → '(', '\\/' → '/' (SST-2's dev is escaped, its "
                                      "train is not)")
    min_freq: int = option(1, "words seen fewer times become <unk>", ge=1)
    max_vocab: int | None = option(None, "keep only the most frequent words", ge=1)
    max_train_examples: int | None = option(None, "the first N training examples only", ge=1)
    word_dropout: float = option(0.0, "chance a training token is replaced by <unk>", ge=0, lt=1)
    holdout: int = option(500, "training sentences (and their phrases) set aside to pick the "
                               "model", ge=0)
    holdout_seed: int = option(0, "seed of the holdout", ge=0)
    eval_batch_size: int = option(256, "sentences evaluated in parallel", ge=1)


# the task's model.chars is a switch; the model's is the character vocabulary size (from the data)
TASK_OPTIONS = {"model.chars": Spec(Kind(bool), Rule(
    help="read each word's spelling too, with a character BiRNN"))}
SECTIONS: dict[str, type] = {"data": SentimentDataConfig, "model": ClassifierConfig,
                             "train": TrainConfig}


def default_model() -> ClassifierConfig:
    recurrent = RecurrentConfig(cell="lstm", layers=1, hidden=128, bidirectional=True)
    # vocab_size and chars are derived from the data; these values only satisfy the checks
    return ClassifierConfig(classes=2, vocab_size=1, embedding=128, pooling="max", dropout=0.5,
                            chars=1, char_embedding=16, char_hidden=32, recurrent=recurrent)


def default_config() -> dict[str, dict[str, Any]]:
    # validation accuracy (on held-out training sentences) picks the weights and paces the
    # schedule: the validation loss starts rising early as the model grows confident, while
    # accuracy still improves, so a loss-driven schedule froze some runs several points short;
    # and a patience of 3 evaluations, as the 500-sentence holdout's accuracy is noisy (±2 %)
    train = TrainConfig(steps=6000, batch_size=64, lr=2e-3, eval_every=250, clip_norm=5.0,
                        plateau_patience=3, early_stop=None, monitor="accuracy", monitor_mode="max")
    model = default_model().to_dict()
    for derived in ("vocab_size", "classes", "pad"):
        del model[derived]
    model["chars"] = False  # on/off here; the character vocabulary size is derived
    return {"data": asdict(SentimentDataConfig()), "model": model, "train": train.to_dict()}


Example = tuple[list[str], str]


def read_split(data: SentimentDataConfig, which: str) -> tuple[list[Example], str]:
    configured = data.train if which == "train" else data.valid
    path = shared_path(f"sst2/{'train' if which == 'train' else 'dev'}.tsv", configured)
    examples, summary = read_labelled_tsv(path, lowercase=data.lowercase)
    if data.unescape_ptb:
        examples = [(unescape_ptb(tokens), label) for tokens, label in examples]
    if which == "train" and data.max_train_examples is not None:
        examples = examples[: data.max_train_examples]
    return examples, str(summary)


def hold_out_sentences(examples: list[Example], count: int, seed: int, min_span: int = 3
                       ) -> tuple[list[Example], list[Example]]:
    """``(rest, held)``: ``count`` whole sentences, and the rest minus their phrases.

    A sentence is an example that no other example contains (phrases are contiguous pieces of
    their sentence). Removed with the held-out sentences: every example of ``min_span`` or more
    tokens that occurs inside one of them; shorter ones ("not good") are generic, not leaks.
    """
    if count <= 0:
        return examples, []
    lines = "\n".join(f" {' '.join(tokens)} " for tokens, _ in examples)
    order = [i for i in range(len(examples)) if len(examples[i][0]) >= 2 * min_span]
    random.Random(seed).shuffle(order)
    held_indices: list[int] = []
    for i in order:
        if lines.count(f" {' '.join(examples[i][0])} ") == 1:  # inside no other example
            held_indices.append(i)
            if len(held_indices) == count:
                break
    if len(held_indices) < count:
        raise ValueError(f"only {len(held_indices)} whole sentences of {2 * min_span}+ words can "
                         f"be held out of {len(examples)} training examples; holdout is {count}")
    spans = set()
    for i in held_indices:
        tokens = examples[i][0]
        spans.update(tuple(tokens[a:b]) for a in range(len(tokens))
                     for b in range(a + min_span, len(tokens) + 1))
    held = set(held_indices)
    rest = [e for i, e in enumerate(examples)
            if i not in held and (len(e[0]) < min_span or tuple(e[0]) not in spans)]
    return rest, [examples[i] for i in held_indices]


@dataclass
class TextEncoder:
    """Text → model inputs, exactly as in training: case, PTB escapes, word and character ids."""

    words: Vocabulary
    chars: Vocabulary | None  # None: the model reads no characters
    lowercase: bool = True
    unescape_ptb: bool = True

    @classmethod
    def build(cls, train: list[Example], data: SentimentDataConfig, chars: bool) -> TextEncoder:
        words = Vocabulary.build((tokens for tokens, _ in train), min_freq=data.min_freq,
                                 max_size=data.max_vocab)
        char_vocab = (Vocabulary.build((list(w) for tokens, _ in train for w in tokens),
                                       specials=(PAD, UNK)) if chars else None)
        return cls(words, char_vocab, data.lowercase, data.unescape_ptb)

    def tokens(self, text: str) -> list[str]:
        """Raw text as the treebank tokenised it ("it's great!" → it 's great !), words the
        vocabulary holds kept whole."""
        # a cased run (--lowercase false) reads a typed "Great" as evaluation reads the file's
        tokens = tokenize_text(text, self.words, self.lowercase, fold_case=self.words.uncased)
        return unescape_ptb(tokens) if self.unescape_ptb else tokens

    def encode(self, tokens: list[str]) -> Encoded:
        chars = [self.chars.encode(list(w)) for w in tokens] if self.chars is not None else None
        return self.words.encode(tokens), chars

    def to_json(self) -> dict[str, Any]:
        return {"words": self.words.to_json(),
                "chars": self.chars.to_json() if self.chars is not None else None,
                "lowercase": self.lowercase, "unescape_ptb": self.unescape_ptb}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TextEncoder:
        chars = data.get("chars")
        return cls(Vocabulary.from_json(data["words"]),
                   Vocabulary.from_json(chars) if chars is not None else None,
                   bool(data.get("lowercase", True)), bool(data.get("unescape_ptb", False)))


Encoded = tuple[list[int], list[list[int]] | None]  # word ids, character ids of each word


def encode_examples(examples: list[Example], encoder: TextEncoder, labels: list[str]
                    ) -> tuple[list[Encoded], list[int]]:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({label for _, label in examples} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} do not occur in the training data (known: {labels})")
    return [encoder.encode(tokens) for tokens, _ in examples], [index[label] for _, label in examples]


def collate(sentences: list[Encoded], labels: list[int], pad: int) -> Batch:
    """Tokens (T, B) and lengths (1, B) [, characters (T, B, W) and their counts (T, B)] in,
    labels (1, B) out."""
    tokens, lengths = pad_sequences([ids for ids, _ in sentences], pad)
    inputs: tuple[Tensor, ...] = (tokens, per_sequence(lengths))
    if sentences and sentences[0][1] is not None:
        inputs += pad_characters([chars for _, chars in sentences], pad)  # type: ignore[misc]
    return Batch(inputs, per_sequence(torch.tensor(labels)))


def model_inputs(batch: Batch) -> dict[str, Tensor | None]:
    tokens, lengths, *chars = batch.inputs
    return {"inputs": tokens, "lengths": lengths[0], "chars": chars[0] if chars else None,
            "char_lengths": chars[1] if chars else None}


class SentimentTask:
    """The Trainer's view of sentence classification."""

    name = NAME

    def __init__(self, train: list[Example], valid: list[Example], data: SentimentDataConfig,
                 model_config: ClassifierConfig, encoder: TextEncoder, labels: list[str],
                 batch_size: int, seed: int, holdout: list[Example] | None = None) -> None:
        self.data, self.model_config, self.encoder, self.labels = data, model_config, encoder, labels
        self.vocab = encoder.words
        self.seed = seed
        self.train_ids, self.train_labels = encode_examples(train, encoder, labels)
        self.valid_examples = valid  # the raw dev sentences, for the end-of-run examples
        # "dev": the held-out split scored at the end; "holdout": training sentences that pick
        # the model (validation runs on it when there is one)
        self.splits = {"dev": encode_examples(valid, encoder, labels)}
        if holdout:
            self.splits["holdout"] = encode_examples(holdout, encoder, labels)
        self.plan = EpochPlan([len(ids) for ids, _ in self.train_ids], batch_size, seed)
        self.counts = {"train": len(train), "valid": len(valid), "holdout": len(holdout or []),
                       "vocabulary": len(self.vocab)}

    @property
    def validation_split(self) -> str:
        return "holdout" if "holdout" in self.splits else "dev"

    def num_batches(self) -> int:
        return len(self.plan)

    def batch(self, index: int) -> Batch:
        chosen = self.plan.indices(index)
        ids = [self.train_ids[i] for i in chosen]
        if self.data.word_dropout > 0:
            # seeded by the batch index, so a resumed run drops the same words
            # (the word's characters stay: spelling is what an unseen word still has)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            ids = [([self.vocab.unk if float(torch.rand((), generator=generator))
                     < self.data.word_dropout else token for token in words], chars)
                   for words, chars in ids]
        return collate(ids, [self.train_labels[i] for i in chosen], self.vocab.pad)

    def chance_loss(self) -> float:
        """The loss of a uniform guess (the Trainer calls far above it divergence)."""
        return math.log(len(self.labels))

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        labels = batch.targets[0]  # (B,)
        loss = F.cross_entropy(model(**model_inputs(batch)), labels)
        return StepResult(loss, None, int(labels.numel()))

    def probabilities(self, model: nn.Module, split: str = "dev", rows: slice = slice(None)
                      ) -> Tensor:
        """Class probabilities (N, C) of every example of ``split`` ("dev" or "holdout"), in
        order (only those of ``rows``, e.g. one rank's share)."""
        return probabilities(model, self.splits[split][0][rows], self.vocab.pad,
                             self.data.eval_batch_size)

    def predictions(self, model: nn.Module | list[nn.Module], split: str = "dev"
                    ) -> tuple[list[int], list[int], float]:
        """(references, predictions, mean cross-entropy) on ``split``; a list of models is an
        ensemble: their class probabilities are averaged."""
        models = model if isinstance(model, list) else [model]
        probs = torch.stack([self.probabilities(m, split) for m in models]).mean(0)  # (N, C)
        return predictions_from(probs, list(self.splits[split][1]))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        references, predictions, loss = self.predictions(model, self.validation_split)
        return {"loss": loss, **classification_metrics(references, predictions, self.labels)}

    def evaluate_totals(self, model: nn.Module, rank: int = 0, world_size: int = 1
                        ) -> dict[str, float]:
        """Rank ``rank``'s share of the validation split as sums: cross-entropy, examples and
        the confusion counts ``c<ref>_<pred>``; the Trainer all-reduces them over the ranks."""
        rows = slice(*shard_span(len(self.splits[self.validation_split][1]), rank, world_size))
        probs = self.probabilities(model, self.validation_split, rows)  # (n, C)
        references = torch.tensor(self.splits[self.validation_split][1][rows], dtype=torch.long)
        nll = F.nll_loss(probs.clamp_min(1e-12).log(), references, reduction="sum")
        counts = confusion_matrix(references.tolist(), probs.argmax(-1).tolist(), len(self.labels))
        classes = range(len(self.labels))
        return {"nll": float(nll), "count": float(len(references)),
                **{f"c{i}_{j}": float(counts[i, j]) for i in classes for j in classes}}

    def metrics_from_totals(self, totals: dict[str, float]) -> dict[str, float]:
        classes = range(len(self.labels))
        counts = torch.tensor([[totals[f"c{i}_{j}"] for j in classes] for i in classes])
        return {"loss": totals["nll"] / max(1.0, totals["count"]),
                **metrics_from_counts(counts, self.labels)}

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "data": asdict(self.data),
                "encoder": self.encoder.to_json(), "labels": self.labels}


@torch.no_grad()
def probabilities(model: nn.Module, sentences: list[Encoded], pad: int, batch_size: int) -> Tensor:
    """Class probabilities (N, C) of encoded sentences, in order, batched longest first."""
    model.eval()
    device = device_of(model)
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i][0]))
    probs = torch.zeros(len(sentences), model.config.classes)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = collate([sentences[i] for i in chosen], [0] * len(chosen), pad)
        probs[chosen] = model(**on_device(model_inputs(batch), device)).softmax(-1).float().cpu()
    return probs


def predictions_from(probs: Tensor, references: list[int]) -> tuple[list[int], list[int], float]:
    """(references, predicted classes, mean cross-entropy) from class probabilities (N, C)."""
    target = torch.tensor(references)
    loss = float(F.nll_loss(probs.clamp_min(1e-12).log(), target)) if references else 0.0
    return references, probs.argmax(-1).tolist(), loss


def classification_metrics(references: list[int], predictions: list[int], labels: list[str]
                           ) -> dict[str, float]:
    """Accuracy, macro F1 and ``f1_<label>`` per class."""
    return metrics_from_counts(confusion_matrix(references, predictions, len(labels)), labels)


def label_names(labels: list[str]) -> list[str]:
    """The classes by name: SST-2's two (labels 0 and 1 and nothing else) as negative and
    positive, any other label set as written (in 0/1/2 data, 1 is not "positive")."""
    return [LABEL_NAMES[label] for label in labels] if sorted(labels) == sorted(LABEL_NAMES) \
        else list(labels)


def metrics_from_counts(counts: Tensor, labels: list[str]) -> dict[str, float]:
    """:func:`classification_metrics` from a confusion matrix (rows reference). Macro F1
    averages the classes that occur in the references or the predictions, as scikit-learn's
    ``f1_score(average="macro")`` does: a class absent from both has no F1 to average."""
    accuracy = float(counts.diagonal().sum()) / max(1.0, float(counts.sum()))
    scores = f1_from_counts(counts)
    seen = [s["f1"] for c, s in enumerate(scores) if counts[c].sum() + counts[:, c].sum() > 0]
    out = {"accuracy": accuracy, "macro_f1": sum(seen) / len(seen) if seen else 0.0}
    out.update({f"f1_{name}": s["f1"] for name, s in zip(label_names(labels), scores)})
    return out


def build(config: dict[str, dict[str, Any]]) -> tuple[SentimentTask, SequenceClassifier, str]:
    """Task and a fresh model from a resolved config (seed the RNGs first)."""
    data = SentimentDataConfig(**config["data"])
    train_config = TrainConfig.from_dict(config["train"])
    require_full_bptt(train_config, NAME)
    train, train_summary = read_split(data, "train")
    valid, valid_summary = read_split(data, "valid")
    train, holdout = hold_out_sentences(train, data.holdout, data.holdout_seed)
    if holdout:
        train_summary += (f"; {len(holdout)} training sentences and their phrases held out to pick "
                          f"the model, {len(train)} examples left to train on")
    model_options = dict(config["model"])
    encoder = TextEncoder.build(train, data, chars=bool(model_options.pop("chars", False)))
    vocab = encoder.words
    labels = sorted({label for _, label in train})
    if len(labels) < 2:
        raise ValueError(f"the training data has {len(labels)} distinct label(s); need two or more")
    chars = len(encoder.chars) if encoder.chars is not None else 0
    model_config = ClassifierConfig.from_dict({**model_options, "vocab_size": len(vocab), "chars": chars,
                                               "classes": len(labels), "pad": vocab.pad})
    task = SentimentTask(train, valid, data, model_config, encoder, labels, train_config.batch_size,
                         train_config.seed, holdout)
    return task, SequenceClassifier(model_config), f"{train_summary}; {valid_summary}"


def load_model(path: str | Path | Checkpoint
               ) -> tuple[SequenceClassifier, TextEncoder, list[str], Checkpoint]:
    """The trained classifier, its text encoder and label names from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: SequenceClassifier(ClassifierConfig.from_dict(m)), required=("data",))
    config = model.config
    if "encoder" in described:
        encoder = from_meta(checkpoint, "task.encoder",
                            lambda: TextEncoder.from_json(described["encoder"]))
    else:  # checkpoints written before the encoder was saved: words only, as then
        encoder = from_meta(checkpoint, "task.vocab", lambda: TextEncoder(
            Vocabulary.from_json(described["vocab"]), None,
            bool(described["data"].get("lowercase", True)), False))
    check_size(checkpoint, "the word vocabulary", len(encoder.words), "vocab_size", config.vocab_size)
    check_size(checkpoint, "the character vocabulary",
               0 if encoder.chars is None else len(encoder.chars), "chars", config.chars)
    labels = described.get("labels")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise CheckpointError(f"{checkpoint.path}: task.labels must be a list of label names")
    check_size(checkpoint, "task.labels", len(labels), "classes", config.classes)
    return model, encoder, list(labels), checkpoint


@torch.no_grad()
def classify(model: SequenceClassifier, encoder: TextEncoder, labels: list[str], text: str
             ) -> tuple[str, float]:
    """The label of one sentence (whitespace-tokenised) and the model's probability for it."""
    tokens = encoder.tokens(text)
    if not tokens:
        raise ValueError("empty sentence")
    model.eval()
    batch = collate([encoder.encode(tokens)], [0], encoder.words.pad)
    probs = model(**model_inputs(batch)).softmax(-1)[0]  # (C,)
    best = int(probs.argmax())
    return labels[best], float(probs[best])


def confusion(task: SentimentTask, model: nn.Module) -> Tensor:
    references, predictions, _ = task.predictions(model)
    return confusion_matrix(references, predictions, len(task.labels))


def report(task: SentimentTask, model: SequenceClassifier, config: dict[str, Any], out: Path) -> None:
    """What a finished run prints: the dev scores of the weights validation chose (also in
    metrics.jsonl), a few classified dev sentences and a confusion PNG."""
    from rnnkit.tasks.common import chosen_weights, plot_confusion, record_test

    which, step = chosen_weights(model, out, f"{task.validation_split} accuracy")
    references, predictions, loss = task.predictions(model)
    scores = classification_metrics(references, predictions, task.labels)
    names = label_names(task.labels)
    f1 = ", ".join(f"F1 {name} {scores['f1_' + name]:.3f}" for name in names)
    print(f"dev ({len(references)} sentences), {which}: accuracy {100 * scores['accuracy']:.2f}%, {f1}")
    if task.validation_split != "dev":  # dev was held out of training and model choice: a test
        record_test(out, "dev", step, {"loss": loss, **scores})
    for (tokens, label), guess in list(zip(task.valid_examples, predictions))[:EXAMPLES]:
        mark = "ok" if task.labels[guess] == label else "  "
        print(f"{mark} {names[guess]:>8}  {' '.join(tokens)}")
    png = plot_confusion(confusion(task, model), names, out / "confusion.png",
                         f"dev: accuracy {100 * scores['accuracy']:.1f}%")
    print(f"confusion matrix: {png}")
