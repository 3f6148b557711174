"""Translation with an attentional encoder-decoder: generated dates, TSV pairs or Multi30k.

Data (``source``):

* ``dates`` (default, needs no files): ``train_size`` / ``valid_size`` pairs from
  :mod:`rnnkit.tasks.dates` ("24 November 2026" → "2026-11-24"), read character by character;
* ``tsv``: ``train`` / ``valid`` files of ``source<TAB>target`` lines, word level by default;
* ``multi30k``: line-aligned ``{train,val}.{de,en}`` in ``directory`` (default
  ``../shared/data/multi30k``), German → English, word level, lower-cased.

``level`` is ``char`` or ``word`` (``auto``: char for dates, word otherwise). Words seen fewer
than ``min_freq`` times in training map to ``<unk>``.

Metrics on the held-out split with batched greedy decoding: exact match (the whole output equals
the reference) and corpus BLEU as sacrebleu computes it (:mod:`rnnkit.metrics.bleu`; outputs joined
without spaces at char level, with spaces at word level). ``attention_heatmap`` draws the
attention of one sentence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.data.text import Vocabulary, pad_sequences, read_parallel, read_tsv_pairs
from rnnkit.metrics.bleu import BLEU, corpus_bleu
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig
from rnnkit.options import Options, option
from rnnkit.tasks import dates
from rnnkit.tasks.common import (
    EpochPlan,
    check_size,
    device_of,
    from_meta,
    load_task_model,
    per_sequence,
    require_full_bptt,
    shared_path,
)
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch, StepResult

NAME = "translate"
SOURCES = ("dates", "tsv", "multi30k")
LEVELS = ("auto", "char", "word")
EXAMPLES = 5  # translations a finished run shows


@dataclass
class TranslateDataConfig(Options):
    source: str = option("dates", "generated dates, TSV pairs or Multi30k", choices=SOURCES)
    train: str | None = option(None, "tsv: training pairs, source<TAB>target", metavar="PATH")
    valid: str | None = option(None, "tsv: validation pairs", metavar="PATH")
    directory: str | None = option(None, "multi30k: its folder (none: ../shared/data/multi30k)",
                                   metavar="PATH")
    source_language: str = option("de", "multi30k: the language translated from")
    target_language: str = option("en", "multi30k: the language translated to")
    level: str = option("auto", "symbols: characters or words (auto: characters for dates)",
                        choices=LEVELS)
    lowercase: bool = option(False, "lower-case the text (multi30k always is)")
    min_freq: int = option(1, "symbols seen fewer times become <unk>", ge=1)
    train_size: int = option(20_000, "dates: generated training pairs", ge=1)
    valid_size: int = option(1_000, "dates: generated validation pairs", ge=1)
    data_seed: int = option(0, "dates: seed of the generated pairs", ge=0)
    max_length: int | None = option(None, "drop training pairs longer than this on either side",
                                    ge=1)
    eval_batch_size: int = option(256, "pairs evaluated in parallel", ge=1)
    max_decode_ratio: float = option(2.0, "greedy output ≤ ratio · source length + 10", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "tsv" and not (self.train and self.valid):
            raise ValueError("the tsv source needs train and valid files")

    @property
    def char_level(self) -> bool:
        return self.level == "char" or (self.level == "auto" and self.source == "dates")


SECTIONS: dict[str, type] = {"data": TranslateDataConfig, "model": Seq2SeqConfig,
                             "train": TrainConfig}
DERIVED = ("source_vocab", "target_vocab", "pad", "bos", "eos")


def default_model() -> Seq2SeqConfig:
    return Seq2SeqConfig(source_vocab=1, target_vocab=1, embedding=64, attention="additive",
                         dropout=0.1,
                         encoder=RecurrentConfig(layers=1, hidden=128, bidirectional=True),
                         decoder=RecurrentConfig(layers=1, hidden=128))


def default_config() -> dict[str, dict[str, Any]]:
    train = TrainConfig(steps=1500, batch_size=64, lr=2e-3, eval_every=250, clip_norm=5.0,
                        plateau_patience=1)
    model = default_model().to_dict()
    for derived in DERIVED:
        del model[derived]
    return {"data": asdict(TranslateDataConfig()), "model": model, "train": train.to_dict()}


Pair = tuple[list[str], list[str]]


def read_pairs(data: TranslateDataConfig) -> tuple[list[Pair], list[Pair], str]:
    """Training and held-out pairs (as symbol lists) and a description of the source."""
    if data.source == "dates":
        train = dates.make_pairs(data.train_size, seed=data.data_seed * 2 + 1)
        valid = dates.make_pairs(data.valid_size, seed=data.data_seed * 2 + 2)
        split = [[(list(s), list(t)) for s, t in part] for part in (train, valid)]
        return split[0], split[1], (f"generated dates ({data.train_size} training, "
                                    f"{data.valid_size} held-out pairs)")
    if data.source == "tsv":
        parts = [read_tsv_pairs(shared_path("", p), data.lowercase) for p in (data.train, data.valid)]
    else:
        folder = shared_path("multi30k", data.directory)
        parts = [read_parallel(folder / f"{split}.{data.source_language}",
                               folder / f"{split}.{data.target_language}", lowercase=True)
                 for split in ("train", "val")]
    (train, train_summary), (valid, valid_summary) = parts
    if data.char_level:  # whitespace-tokenised text back to characters, spaces included
        train, valid = ([(list(" ".join(s)), list(" ".join(t))) for s, t in part]
                        for part in (train, valid))
    return train, valid, f"{train_summary}; {valid_summary}"


def detokenize(symbols: list[str], char_level: bool) -> str:
    return "".join(symbols) if char_level else " ".join(symbols)


def collate(sources: list[list[int]], targets: list[list[int]], pad: int) -> Batch:
    """inputs (source (S', B), source lengths (1, B)); targets (target (T, B) ending in </s>,
    target lengths (1, B)).

    The Trainer cuts every tensor of a batch to ``Batch.length`` = the source's dim 0, so the
    source is padded to S' = max(S, T) rows: a target longer than its source stays whole (the
    encoder reads only each sentence's real length).
    """
    source, source_lengths = pad_sequences(sources, pad)
    target, target_lengths = pad_sequences(targets, pad)
    if target.shape[0] > source.shape[0]:
        extra = source.new_full((target.shape[0] - source.shape[0], source.shape[1]), pad)
        source = torch.cat((source, extra))  # (T, B)
    return Batch((source, per_sequence(source_lengths)), (target, per_sequence(target_lengths)))


@torch.no_grad()
def translate_encoded(model: Seq2Seq, sources: list[list[int]], targets: list[list[int]],
                      target_vocab: Vocabulary, data: TranslateDataConfig
                      ) -> tuple[list[list[str]], float]:
    """Greedy outputs (symbol lists, in order) of encoded sources and the teacher-forced loss
    per token of their references (targets ending in </s>)."""
    model.eval()
    device = device_of(model)
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    outputs: list[list[str]] = [[] for _ in order]
    total, tokens = 0.0, 0
    size = data.eval_batch_size
    for start in range(0, len(order), size):
        chosen = order[start:start + size]
        batch = collate([sources[i] for i in chosen], [targets[i] for i in chosen], target_vocab.pad)
        (source, source_lengths), (target, target_lengths) = batch.inputs, batch.targets
        source, target = source.to(device), target.to(device)
        count = int(target_lengths.sum())
        total += float(model.loss(source, source_lengths[0], target, target_lengths[0])) * count
        tokens += count
        limit = int(data.max_decode_ratio * source.shape[0]) + 10
        decoded = model.greedy(source, source_lengths[0], max_length=limit)
        for row, i in enumerate(chosen):
            outputs[i] = target_vocab.decode(decoded.tokens[row])
    return outputs, total / max(1, tokens)


def score_outputs(outputs: list[list[str]], references: list[list[str]], char_level: bool
                  ) -> tuple[float, BLEU]:
    """Exact-match accuracy and corpus BLEU of outputs against references (symbol lists)."""
    exact = sum(out == ref for out, ref in zip(outputs, references)) / max(1, len(references))
    bleu = corpus_bleu([detokenize(o, char_level) for o in outputs],
                       [detokenize(ref, char_level) for ref in references])
    return exact, bleu


class TranslateTask:
    """The Trainer's view of sequence-to-sequence translation."""

    name = NAME

    def __init__(self, train: list[Pair], valid: list[Pair], data: TranslateDataConfig,
                 model_config: Seq2SeqConfig, source_vocab: Vocabulary, target_vocab: Vocabulary,
                 batch_size: int, seed: int) -> None:
        self.data, self.model_config = data, model_config
        self.source_vocab, self.target_vocab = source_vocab, target_vocab
        self.train_sources = [source_vocab.encode(s) for s, _ in train]
        self.train_targets = [target_vocab.encode(t, eos=True) for _, t in train]
        self.valid = valid
        self.valid_sources = [source_vocab.encode(s) for s, _ in valid]
        self.valid_targets = [target_vocab.encode(t, eos=True) for _, t in valid]
        self.plan = EpochPlan([len(s) for s in self.train_sources], batch_size, seed)
        self.counts = {"train": len(train), "valid": len(valid), "source vocabulary":
                       len(source_vocab), "target vocabulary": len(target_vocab)}

    def num_batches(self) -> int:
        return len(self.plan)

    def batch(self, index: int) -> Batch:
        chosen = self.plan.indices(index)
        return collate([self.train_sources[i] for i in chosen], [self.train_targets[i] for i in chosen],
                       self.source_vocab.pad)

    def chance_loss(self) -> float:
        """The loss of a uniform guess (the Trainer calls far above it divergence)."""
        return math.log(self.model_config.target_vocab)

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        (source, source_lengths), (target, target_lengths) = batch.inputs, batch.targets
        loss = model.loss(source, source_lengths[0], target, target_lengths[0])
        return StepResult(loss, None, int(target_lengths.sum()))

    def translations(self, model: Seq2Seq) -> tuple[list[list[str]], float]:
        """Greedy outputs (symbol lists, in held-out order) and the teacher-forced loss per token."""
        return translate_encoded(model, self.valid_sources, self.valid_targets, self.target_vocab,
                                 self.data)

    def scores(self, outputs: list[list[str]]) -> tuple[float, BLEU]:
        """Exact-match accuracy and corpus BLEU of held-out outputs."""
        return score_outputs(outputs, [ref for _, ref in self.valid], self.data.char_level)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        outputs, loss = self.translations(model)  # type: ignore[arg-type]
        exact, bleu = self.scores(outputs)
        return {"loss": loss, "exact": exact, "bleu": bleu.score}

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "data": asdict(self.data),
                "source_vocab": self.source_vocab.to_json(),
                "target_vocab": self.target_vocab.to_json()}


def build(config: dict[str, dict[str, Any]]) -> tuple[TranslateTask, Seq2Seq, str]:
    """Task and a fresh model from a resolved config (seed the RNGs first)."""
    data = TranslateDataConfig(**config["data"])
    train_config = TrainConfig.from_dict(config["train"])
    require_full_bptt(train_config, NAME)
    train, valid, source = read_pairs(data)
    if data.max_length is not None:
        train = [(s, t) for s, t in train if len(s) <= data.max_length and len(t) <= data.max_length]
    if not train or not valid:
        raise ValueError(f"no training or held-out pairs in {source}")
    source_vocab = Vocabulary.build((s for s, _ in train), min_freq=data.min_freq)
    target_vocab = Vocabulary.build((t for _, t in train), min_freq=data.min_freq)
    model_config = Seq2SeqConfig.from_dict({
        **config["model"], "source_vocab": len(source_vocab), "target_vocab": len(target_vocab),
        "pad": target_vocab.pad, "bos": target_vocab.bos, "eos": target_vocab.eos})
    task = TranslateTask(train, valid, data, model_config, source_vocab, target_vocab,
                         train_config.batch_size, train_config.seed)
    return task, Seq2Seq(model_config), source


@dataclass
class Translator:
    """A trained model with what it needs to read and write text."""

    model: Seq2Seq
    source_vocab: Vocabulary
    target_vocab: Vocabulary
    data: TranslateDataConfig

    def symbols(self, text: str) -> list[str]:
        if self.data.source == "multi30k" or self.data.lowercase:
            text = text.lower()
        return list(text) if self.data.char_level else text.split()

    def source_ids(self, text: str) -> Tensor:
        symbols = self.symbols(text)
        if not symbols:
            raise ValueError("empty source sentence")
        return torch.tensor(self.source_vocab.encode(symbols))  # (S,)

    @torch.no_grad()
    def translate(self, text: str, beam_width: int = 1) -> str:
        self.model.eval()
        source = self.source_ids(text)
        limit = int(self.data.max_decode_ratio * source.numel()) + 10
        if beam_width > 1:
            best = self.model.beam(source.unsqueeze(1), torch.tensor([source.numel()]), beam_width,
                                   max_length=limit)[0][0]
            tokens = best.tokens
        else:
            tokens = self.model.greedy(source.unsqueeze(1), torch.tensor([source.numel()]),
                                       max_length=limit).tokens[0]
        return detokenize(self.target_vocab.decode(tokens), self.data.char_level)


def load_model(path: str | Path | Checkpoint) -> tuple[Translator, Checkpoint]:
    """The trained translator from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: Seq2Seq(Seq2SeqConfig.from_dict(m)),
        required=("data", "source_vocab", "target_vocab"))
    vocabs = []
    for side in ("source_vocab", "target_vocab"):
        vocab = from_meta(checkpoint, f"task.{side}", lambda side=side: Vocabulary.from_json(
            described[side]))
        check_size(checkpoint, f"task.{side}", len(vocab), side, getattr(model.config, side))
        vocabs.append(vocab)
    data = from_meta(checkpoint, "task.data", lambda: TranslateDataConfig(**described["data"]))
    return Translator(model, vocabs[0], vocabs[1], data), checkpoint


def attention_heatmap(translator: Translator, text: str, path: str | Path) -> Path | None:
    """A PNG of the attention weights translating ``text`` (None for a model without attention)."""
    source = translator.source_ids(text)
    tokens = translator.model.greedy(source.unsqueeze(1), torch.tensor([source.numel()]),
                                     max_length=int(2 * source.numel()) + 10).tokens[0]
    weights = translator.model.attention_map(source, tokens)  # (len(tokens) + 1, S)
    if weights is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source_labels = translator.source_vocab.decode(source.tolist(), strip_specials=False)
    output_labels = [*translator.target_vocab.decode(tokens, strip_specials=False), "</s>"]
    fig, ax = plt.subplots(figsize=(1.5 + 0.32 * len(source_labels), 1.2 + 0.32 * len(output_labels)))
    ax.imshow(weights.numpy(), cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(source_labels)), [s if s != " " else "␣" for s in source_labels],
                  rotation=0 if translator.data.char_level else 90)
    ax.set_yticks(range(len(output_labels)), output_labels)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title(f"attention: {text!r}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    # the CJK date formats need a font with those glyphs; a missing glyph is only a warning
    from rnnkit.viz.curves import save_figure  # atomic, never through a symlink

    save_figure(fig, path, dpi=120)
    return path


def describe_metrics(valid: dict[str, float]) -> str:
    return (f"BLEU {valid['bleu']:.2f}, exact match {100 * valid['exact']:.2f}%, "
            f"loss {valid['loss']:.4f}")


def report(task: TranslateTask, model: Seq2Seq, config: dict[str, Any], out: Path) -> None:
    """What a finished run prints: a few held-out translations of the weights validation chose."""
    from rnnkit.tasks.common import chosen_weights

    which, _ = chosen_weights(model, out)
    outputs, _ = task.translations(model)
    print(f"held-out translations, {which}:")
    char = task.data.char_level
    for (source, reference), output in list(zip(task.valid, outputs))[:EXAMPLES]:
        mark = "ok" if output == reference else "  "
        print(f"{mark} {detokenize(source, char)}  →  {detokenize(output, char)}"
              + ("" if output == reference else f"   (reference: {detokenize(reference, char)})"))

