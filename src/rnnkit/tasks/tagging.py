"""Sequence tagging: slot filling with a joint intent head (ATIS), or NER from CoNLL columns.

Data (``format``; ``auto``, the default, tells the two apart by the training path,
:func:`rnnkit.data.conll.detect_format`):

* ``atis``: folders holding ``seq.in`` (tokens), ``seq.out`` (one BIO tag per token) and
  ``label`` (one intent per utterance); by default ``../shared/data/atis/{train,dev,test}``;
* ``conll``: files of one ``token ... tag`` line per token, sentences separated by blank lines
  (CoNLL-2003 layout; ``token_column`` / ``tag_column`` pick the columns). No intents, so no
  intent head. Tags are read as written (CoNLL-2003: IOB1).

Words reach the word embedding as :func:`~rnnkit.data.conll.word_key` makes them (``lowercase``,
``zero_digits``) while the character BiRNN reads them as written, so case survives there.
``tag_scheme=iobes`` trains on the tags rewritten in IOBES; predictions are written back in the
data's own scheme before anything scores or shows them. ``singleton_unk`` reads a word seen once
in training as ``<unk>`` with that probability in each training batch, so the ``<unk>`` vector is
trained on rare words like the unseen ones it stands for at test time (Lample et al. 2016, §4).
``examples/tagging-conll2003.yaml`` holds the settings of the CoNLL-2003 result in
docs/results.md.

The model is the BiLSTM :class:`~rnnkit.models.tagger.Tagger`, with a linear-chain CRF
(``crf``) and a character BiLSTM per word (``chars > 0``) as options; with intents the loss is
tag loss + ``intent_weight`` · intent cross-entropy. The dev split steers the schedule and early
stopping; :meth:`TaggingTask.scores` reports any split.

Metrics: entity-level precision / recall / F1 as seqeval computes them
(:mod:`rnnkit.metrics.entities`), intent accuracy, and sentence accuracy (all tags and the intent right).
Tags or intents that never occur in training map to ``<unk>`` (a predicted ``<unk>`` tag reads as
``O``), so scores on dev/test still count every reference entity and intent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.data.conll import (
    SCHEMES,
    convert,
    detect_format,
    detect_scheme,
    evident_scheme,
    is_tag,
    word_key,
)
from rnnkit.data.text import (
    PAD,
    UNK,
    Vocabulary,
    pad_characters,
    pad_sequences,
    read_atis,
    read_conll,
)
from rnnkit.metrics.entities import EntityScores, entity_scores
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.models.tagger import Tagger, TaggerConfig
from rnnkit.options import Kind, Options, Rule, Spec, option
from rnnkit.tasks.common import (
    EpochPlan,
    check_size,
    device_of,
    from_meta,
    load_task_model,
    on_device,
    per_sequence,
    require_full_bptt,
    shared_path,
)
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch, StepResult

NAME = "tagging"
FORMATS = ("auto", "atis", "conll")
TAG_SCHEMES = ("as_read", "iobes")
SPLITS = ("train", "valid", "test")
SHARED = {"train": "atis/train", "valid": "atis/dev", "test": "atis/test"}
EXAMPLES = 5  # tagged sentences a finished run shows


@dataclass
class TaggingDataConfig(Options):
    format: str = option("auto", "atis: a folder of seq.in/seq.out/label; conll: token and tag "
                                 "columns; auto: told by the training path", choices=FORMATS)
    train: str | None = option(None, "atis: a folder; conll: a file (none: "
                                     "../shared/data/atis/train)", metavar="PATH")
    valid: str | None = option(None, "validation split (none: ../shared/data/atis/dev)",
                               metavar="PATH")
    test: str | None = option(None, "test split (none: ../shared/data/atis/test when train is "
                                    "the shared ATIS too, else no test)", metavar="PATH")
    token_column: int = option(0, "conll: the token's column")
    tag_column: int = option(-1, "conll: the tag's column (-1: the last)")
    lowercase: bool = option(False, "lower-case the words for the word embedding (the "
                                    "characters keep their case)")
    zero_digits: bool = option(False, "every digit reads as 0 for the word embedding")
    min_freq: int = option(1, "words seen fewer times become <unk>", ge=1)
    singleton_unk: float = option(0.0, "probability that a word seen once in training reads as "
                                       "<unk> in a training batch", ge=0, le=1)
    tag_scheme: str = option("as_read", "train on the tags as read, or rewritten in IOBES "
                                        "(scored in the data's scheme)", choices=TAG_SCHEMES)
    eval_batch_size: int = option(256, "sentences evaluated in parallel", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format == "conll" and not (self.train and self.valid):
            raise ValueError("the conll format needs train and valid files")

    def resolved_format(self) -> str:
        """``atis`` or ``conll``: ``auto`` is told by the training path (none: the shared ATIS)."""
        if self.format != "auto":
            return self.format
        if self.train is None:
            return "atis"
        found = detect_format(shared_path("", self.train), self.tag_column)
        if found == "conll" and not self.valid:
            raise ValueError(f"{self.train} is a CoNLL file: give the validation file too "
                             "(--valid PATH)")
        return found


# the task's model.chars is a switch; the model's is the character vocabulary size (from the data)
TASK_OPTIONS = {"model.chars": Spec(Kind(bool), Rule(
    help="read each word's spelling too, with a character BiRNN"))}
SECTIONS: dict[str, type] = {"data": TaggingDataConfig, "model": TaggerConfig,
                             "train": TrainConfig}
DERIVED = ("vocab_size", "tags", "intents", "pad")


def default_model() -> TaggerConfig:
    recurrent = RecurrentConfig(cell="lstm", layers=1, hidden=128, bidirectional=True)
    # vocab_size / tags / intents / chars come from the data: placeholders satisfy the checks
    return TaggerConfig(vocab_size=1, tags=1, embedding=100, crf=True, chars=0, char_embedding=16,
                        char_hidden=25, intent_pooling="max", dropout=0.4, recurrent=recurrent)


def default_config() -> dict[str, dict[str, Any]]:
    train = TrainConfig(steps=3000, batch_size=32, lr=2e-3, eval_every=140, clip_norm=5.0,
                        plateau_patience=2, early_stop=8)
    model = default_model().to_dict()
    for derived in DERIVED:
        del model[derived]
    model["chars"] = False  # on/off here; the character vocabulary size is derived
    return {"data": asdict(TaggingDataConfig()), "model": model, "train": train.to_dict()}


Example = tuple[list[str], list[str], str | None]  # tokens, tags, intent (None: no intents)


def read_split(data: TaggingDataConfig, split: str) -> tuple[list[Example], str] | None:
    """The examples of ``split`` and a summary; None for a conll test split not given."""
    configured = getattr(data, split)
    if split == "test" and configured is None and data.train is not None:
        return None  # the user's own data has no test split: never the shared ATIS one
    if data.resolved_format() == "atis":
        return read_examples(shared_path(SHARED[split], configured), "atis", data)
    if configured is None:
        return None
    return read_examples(shared_path("", configured), "conll", data)


def read_examples(path: Path, format: str, data: TaggingDataConfig) -> tuple[list[Example], str]:
    """The sentences of an ATIS folder or a CoNLL file (``format``) and a summary; a tag that
    is not ``O`` or ``B-``/``I-``/``E-``/``S-`` and a type raises one line naming it."""
    if format == "atis":
        atis, summary = read_atis(path)
        examples: list[Example] = [(tokens, tags, intent) for tokens, tags, intent in atis]
        where, column = f"{path / 'seq.out'}", ""
    else:
        conll, summary = read_conll(path, data.token_column, data.tag_column)
        examples = [(tokens, tags, None) for tokens, tags in conll]
        where, column = str(path), f" in column {data.tag_column} (--tag-column)"
    # anything else would be read as a chunk of its own sort and scored silently
    for number, (_, tags, _) in enumerate(examples, start=1):
        for position, tag in enumerate(tags, start=1):
            if not is_tag(tag):
                raise ValueError(f"{where}: sentence {number}, token {position}: {tag!r}{column} "
                                 "is not a tag (O, B-X, I-X, E-X or S-X)")
    return examples, str(summary)


@dataclass
class Vocabularies:
    """The vocabularies, and how tokens and tags map to them (from the data config)."""

    words: Vocabulary  # of word keys (lower-cased, digits 0, as the data config asks)
    tags: Vocabulary  # "<unk>" first: tags unseen in training; in IOBES if trained so
    intents: Vocabulary | None
    chars: Vocabulary | None  # "<pad>", "<unk>" first, so character padding is id 0 as for words
    scheme: str | None = None  # the data's scheme, to write predictions in; None: tags as read
    lowercase: bool = False
    zero_digits: bool = False
    # the scheme the training tags are written in, so that data written in another one is
    # scored in its own (None: a run from before it was recorded; its tags are taken as read)
    data_scheme: str | None = None

    @classmethod
    def build(cls, train: list[Example], data: TaggingDataConfig, chars: bool) -> Vocabularies:
        words = Vocabulary.build(
            ([word_key(t, data.lowercase, data.zero_digits) for t in tokens] for tokens, _, _ in train),
            min_freq=data.min_freq)
        data_scheme = detect_scheme([tags for _, tags, _ in train])
        scheme = data_scheme if data.tag_scheme == "iobes" else None
        tags = Vocabulary.build((t if scheme is None else convert(t, "iobes") for _, t, _ in train),
                                specials=(UNK,))
        has_intents = train[0][2] is not None
        intents = (Vocabulary.build(([i] for _, _, i in train if i), specials=(UNK,))
                   if has_intents else None)
        char_vocab = (Vocabulary.build((list(w) for tokens, _, _ in train for w in tokens),
                                       specials=(PAD, UNK)) if chars else None)
        return cls(words, tags, intents, char_vocab, scheme, data.lowercase, data.zero_digits,
                   data_scheme)

    def __contains__(self, token: object) -> bool:
        """Whether ``token`` has a word vector of its own (else it reads as <unk>)."""
        return isinstance(token, str) and word_key(token, self.lowercase,
                                                   self.zero_digits) in self.words

    def word_keys(self, tokens: list[str]) -> list[str]:
        return [word_key(t, self.lowercase, self.zero_digits) for t in tokens]

    def trained_tags(self, tags: list[str]) -> list[str]:
        """A sentence's tags as the model learns them (IOBES if trained so)."""
        return tags if self.scheme is None else convert(tags, "iobes")

    def read_tags(self, tags: list[str]) -> list[str]:
        """Predicted tags in the data's own scheme."""
        return tags if self.scheme is None else convert(tags, self.scheme)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: None if v is None else v.to_json()
                               for name, v in (("words", self.words), ("tags", self.tags),
                                               ("intents", self.intents), ("chars", self.chars))}
        return {**out, "scheme": self.scheme, "data_scheme": self.data_scheme}

    @classmethod
    def from_json(cls, data: dict[str, Any], lowercase: bool = False, zero_digits: bool = False
                  ) -> Vocabularies:
        """``lowercase`` / ``zero_digits`` come from the run's data config."""
        def load(name: str) -> Vocabulary | None:
            return None if data[name] is None else Vocabulary.from_json(data[name])

        words, tags = load("words"), load("tags")
        assert words is not None and tags is not None
        scheme = data.get("scheme")  # absent in runs from before tag schemes: tags as read
        data_scheme = data.get("data_scheme")  # absent in older runs: tags as read
        for name, value in (("scheme", scheme), ("data_scheme", data_scheme)):
            if value is not None and value not in SCHEMES:
                raise ValueError(f"unknown tag scheme {value!r} in the vocabulary's {name}")
        return cls(words, tags, load("intents"), load("chars"), scheme, lowercase, zero_digits,
                   data_scheme)


@dataclass
class Encoded:
    """One split as ids, with the original tags and intents kept for scoring."""

    words: list[list[int]]
    chars: list[list[list[int]]] | None
    tags: list[list[int]]
    intents: list[int] | None
    gold_tags: list[list[str]]
    gold_intents: list[str | None]
    tokens: list[list[str]] = field(default_factory=list)  # as read, for showing examples
    # the scheme the split's tags are written in where it is not the training data's: the
    # predictions are written in it before they are compared with gold_tags
    scheme: str | None = None


def encode(examples: list[Example], vocab: Vocabularies) -> Encoded:
    """Ids of ``examples``. Tags written in another scheme than the training data's (IOB2
    data for a model trained on IOB1) are read as the chunks they mean: rewritten in the
    training scheme for the loss, and the split keeps its scheme for the predictions."""
    trained_on, shown = vocab.data_scheme, evident_scheme([tags for _, tags, _ in examples])
    other = shown if trained_on is not None and shown not in (None, trained_on) else None

    def learned(tags: list[str]) -> list[str]:
        if other is not None and trained_on is not None:
            tags = convert(tags, trained_on)
        return vocab.trained_tags(tags)

    chars = None
    if vocab.chars is not None:
        chars = [[vocab.chars.encode(list(w)) for w in tokens] for tokens, _, _ in examples]
    intents = None
    if vocab.intents is not None:
        intents = [vocab.intents.encode([i or UNK])[0] for _, _, i in examples]
    return Encoded([vocab.words.encode(vocab.word_keys(tokens)) for tokens, _, _ in examples],
                   chars, [vocab.tags.encode(learned(tags)) for _, tags, _ in examples],
                   intents,
                   [tags for _, tags, _ in examples], [i for _, _, i in examples],
                   [tokens for tokens, _, _ in examples], other)


def singleton_ids(sentences: list[list[int]]) -> Tensor:
    """The word ids that occur exactly once in ``sentences`` (1-D int64)."""
    counts = torch.bincount(torch.tensor([i for ids in sentences for i in ids], dtype=torch.int64))
    return torch.nonzero(counts == 1).flatten()


def collate(split: Encoded, chosen: list[int]) -> Batch:
    """inputs (tokens (T, B), lengths (1, B)[, chars (T, B, W), char_lengths (T, B)]);
    targets (tags (T, B), intents (1, B) or an empty (1, 0))."""
    tokens, lengths = pad_sequences([split.words[i] for i in chosen])
    inputs: tuple[Tensor, ...] = (tokens, per_sequence(lengths))
    if split.chars is not None:
        inputs += pad_characters([split.chars[i] for i in chosen])
    tags, _ = pad_sequences([split.tags[i] for i in chosen])
    if split.intents is not None:
        intents = torch.tensor([split.intents[i] for i in chosen])
    else:
        intents = torch.zeros(0, dtype=torch.long)
    return Batch(inputs, (tags, per_sequence(intents)))


def _model_args(batch: Batch) -> dict[str, Tensor | None]:
    tokens, lengths, *chars = batch.inputs
    tags, intents = batch.targets
    return {"tokens": tokens, "lengths": lengths[0], "chars": chars[0] if chars else None,
            "char_lengths": chars[1] if chars else None,
            "intents": intents[0] if intents.numel() else None, "tags": tags}


@dataclass
class TaggingScores:
    entities: EntityScores
    intent_accuracy: float | None
    sentence_accuracy: float  # every tag (and the intent) right
    loss: float

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss, "slot_f1": self.entities.f1,
               "slot_precision": self.entities.precision, "slot_recall": self.entities.recall,
               "sentence_acc": self.sentence_accuracy}
        if self.intent_accuracy is not None:
            out["intent_acc"] = self.intent_accuracy
        return out


def _tag(vocab: Vocabularies, index: int) -> str:
    tag = vocab.tags.tokens[index]
    return "O" if tag == UNK else tag


@torch.no_grad()
def predict_split(model: nn.Module, data: Encoded, vocab: Vocabularies, batch_size: int
                  ) -> tuple[list[list[str]], list[str | None] | None, float]:
    """Predicted tags and intents (strings, in the split's order) and the mean loss."""
    model.eval()
    device = device_of(model)
    order = sorted(range(len(data.words)), key=lambda i: -len(data.words[i]))
    tags: list[list[str]] = [[] for _ in order]
    intents: list[str | None] = [None for _ in order]
    total = 0.0
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        args = on_device(_model_args(collate(data, chosen)), device)
        total += float(model.loss(**args)) * len(chosen)
        best, best_intents = model.decode(args["tokens"], args["lengths"], args["chars"],
                                          args["char_lengths"])
        for row, i in enumerate(chosen):
            tags[i] = vocab.read_tags([_tag(vocab, t) for t in best[row]])
            if data.scheme is not None:
                tags[i] = convert(tags[i], data.scheme)
            if best_intents is not None and vocab.intents is not None:
                intents[i] = vocab.intents.tokens[best_intents[row]]
    return tags, (intents if vocab.intents is not None else None), total / max(1, len(order))


def score_split(model: nn.Module, data: Encoded, vocab: Vocabularies, batch_size: int
                ) -> TaggingScores:
    """Entity scores, intent and sentence accuracy, and the loss on an encoded split."""
    predicted, intents, loss = predict_split(model, data, vocab, batch_size)
    right = [p == g for p, g in zip(predicted, data.gold_tags)]
    intent_accuracy = None
    if intents is not None:
        hits = [p == g for p, g in zip(intents, data.gold_intents)]
        intent_accuracy = sum(hits) / len(hits)
        right = [a and b for a, b in zip(right, hits)]
    return TaggingScores(entity_scores(data.gold_tags, predicted), intent_accuracy,
                         sum(right) / len(right), loss)


class TaggingTask:
    """The Trainer's view of slot filling / NER."""

    name = NAME

    def __init__(self, splits: dict[str, list[Example]], data: TaggingDataConfig,
                 model_config: TaggerConfig, vocab: Vocabularies, batch_size: int, seed: int) -> None:
        self.data, self.model_config, self.vocab = data, model_config, vocab
        self.splits = {name: encode(examples, vocab) for name, examples in splits.items()}
        train = self.splits["train"]
        self.plan = EpochPlan([len(w) for w in train.words], batch_size, seed)
        self.counts = {name: len(split.words) for name, split in self.splits.items()}
        self.seed = seed
        self.singletons = singleton_ids(train.words) if data.singleton_unk > 0 else None

    def num_batches(self) -> int:
        return len(self.plan)

    def batch(self, index: int) -> Batch:
        batch = collate(self.splits["train"], self.plan.indices(index))
        if self.singletons is None:
            return batch
        # a generator per batch index: the same batch gets the same <unk>s after a resume
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = batch.inputs[0]  # (T, B)
        drawn = torch.rand(tokens.shape, generator=generator) < self.data.singleton_unk
        unk = torch.where(torch.isin(tokens, self.singletons) & drawn, self.vocab.words.unk, tokens)
        return Batch((unk, *batch.inputs[1:]), batch.targets)

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        args = _model_args(batch)
        loss = model.loss(**args)
        return StepResult(loss, None, int(args["lengths"].sum()))  # type: ignore[union-attr]

    def predict(self, model: nn.Module, split: str = "valid"
                ) -> tuple[list[list[str]], list[str | None] | None, float]:
        """Predicted tags and intents (strings, in the split's order) and the mean loss."""
        return predict_split(model, self.splits[split], self.vocab, self.data.eval_batch_size)

    def scores(self, model: nn.Module, split: str = "valid") -> TaggingScores:
        return score_split(model, self.splits[split], self.vocab, self.data.eval_batch_size)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.scores(model, "valid").metrics()

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "data": asdict(self.data),
                "vocab": self.vocab.to_json()}


def build(config: dict[str, dict[str, Any]]) -> tuple[TaggingTask, Tagger, str]:
    """Task and a fresh model from a resolved config (seed the RNGs first)."""
    data = TaggingDataConfig(**config["data"])
    train_config = TrainConfig.from_dict(config["train"])
    require_full_bptt(train_config, NAME)
    splits, summaries = {}, []
    for split in SPLITS:
        read = read_split(data, split)
        if read is not None:
            splits[split], summary = read
            summaries.append(summary)
    if not splits["train"]:
        raise ValueError(f"no training sentences in {summaries[0]}")
    model_options = dict(config["model"])
    use_chars = bool(model_options.pop("chars", False))
    vocab = Vocabularies.build(splits["train"], data, use_chars)
    model_config = TaggerConfig.from_dict({
        **model_options, "vocab_size": len(vocab.words), "tags": len(vocab.tags),
        "intents": len(vocab.intents) if vocab.intents is not None else 0,
        "chars": len(vocab.chars) if vocab.chars is not None else 0, "pad": vocab.words.pad})
    task = TaggingTask(splits, data, model_config, vocab, train_config.batch_size, train_config.seed)
    return task, Tagger(model_config), "; ".join(summaries)


def load_model(path: str | Path | Checkpoint) -> tuple[Tagger, Vocabularies, Checkpoint]:
    """The trained tagger and its vocabularies from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: Tagger(TaggerConfig.from_dict(m)), required=("vocab",))
    data = from_meta(checkpoint, "task.data", lambda: TaggingDataConfig(**described["data"]))
    vocab = from_meta(checkpoint, "task.vocab", lambda: Vocabularies.from_json(
        described["vocab"], data.lowercase, data.zero_digits))
    config = model.config
    for what, part, size in (("words", vocab.words, "vocab_size"), ("tags", vocab.tags, "tags"),
                              ("intents", vocab.intents, "intents"), ("chars", vocab.chars, "chars")):
        check_size(checkpoint, f"task.vocab.{what}", 0 if part is None else len(part), size,
                   getattr(config, size))
    return model, vocab, checkpoint


@torch.no_grad()
def tag_sentence(model: Tagger, vocab: Vocabularies, tokens: list[str]
                 ) -> tuple[list[str], str | None]:
    """Tags of one tokenised sentence and its intent (None without an intent head)."""
    if not tokens:
        raise ValueError("empty sentence")
    example: Example = (tokens, ["O"] * len(tokens), None)
    split = encode([example], vocab)
    args = _model_args(collate(split, [0]))
    best, intents = model.decode(args["tokens"], args["lengths"], args["chars"], args["char_lengths"])
    tags = vocab.read_tags([_tag(vocab, t) for t in best[0]])
    intent = vocab.intents.tokens[intents[0]] if intents is not None and vocab.intents else None
    return tags, intent


def bracketed(tokens: list[str], entities: list[tuple[str, int, int]]) -> str:
    """A tagged sentence for people: "flights from [new york]fromloc.city_name to ..."."""
    words, at = [], 0
    for kind, start, end in entities:
        words += [*tokens[at:start], f"[{' '.join(tokens[start:end + 1])}]{kind}"]
        at = end + 1
    return " ".join(words + tokens[at:])


def describe_metrics(valid: dict[str, float]) -> str:
    intent = f", intent accuracy {100 * valid['intent_acc']:.2f}%" if "intent_acc" in valid else ""
    return (f"slot F1 {100 * valid['slot_f1']:.2f}{intent}, sentence accuracy "
            f"{100 * valid['sentence_acc']:.2f}%, loss {valid['loss']:.4f}")


def report(task: TaggingTask, model: Tagger, config: dict[str, Any], out: Path) -> None:
    """What a finished run prints: the test split's scores with the weights validation chose
    (also in metrics.jsonl) where the data has one, and a few tagged held-out sentences."""
    from rnnkit.metrics.entities import get_entities
    from rnnkit.tasks.common import chosen_weights, record_test

    which, step = chosen_weights(model, out)
    split = "test" if "test" in task.splits else "valid"
    if split == "test":
        scores = task.scores(model, "test")
        print(f"test ({task.counts['test']} sentences), {which}: {describe_metrics(scores.metrics())}")
        record_test(out, "test", step, scores.metrics())
    tags, intents, _ = task.predict(model, split)
    data = task.splits[split]
    print(f"{split} sentences tagged ([entity]type; ok: every tag right):")
    for i in range(min(EXAMPLES, len(tags))):
        mark = "ok" if tags[i] == data.gold_tags[i] else "  "
        intent = f"{intents[i]}: " if intents is not None else ""
        print(f"{mark} {intent}{bracketed(data.tokens[i], get_entities(tags[i]))}")

