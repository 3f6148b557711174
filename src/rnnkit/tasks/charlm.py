"""Character-level language modelling: data, the Trainer task, evaluation and sampling.

Text is read as Unicode code points (or UTF-8 bytes with ``byte_level``); the first
``1 - valid_fraction`` of the text trains, the rest validates. Losses are in nats per symbol;
bits per symbol (``bpc``) = nats / ln 2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.data.corpus import STDLIB_CHARS, read_files, read_stdlib
from rnnkit.data.streams import (
    batchify,
    encode_tensor,
    evaluation_rows,
    num_windows,
    stream_window,
)
from rnnkit.data.vocab import CharVocab
from rnnkit.models.language_model import LanguageModel, LMConfig
from rnnkit.options import Options, option
from rnnkit.tasks.common import check_size, from_meta, load_task_model
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.distributed import shard_span
from rnnkit.train.task import Batch, StepResult

NAME = "charlm"


@dataclass
class DataConfig(Options):
    files: list[str] = option(help="UTF-8 text file(s); empty: the Python standard library",
                              factory=list, metavar="PATH")
    byte_level: bool = option(False, "model UTF-8 bytes instead of code points")
    seq_len: int = option(100, "time steps per training batch", ge=1)
    valid_fraction: float = option(0.1, "last fraction of the text to validate on", gt=0, lt=1)
    valid_chars: int | None = option(100_000, "cap on validation symbols, so evaluation stays "
                                              "quick on big corpora", ge=1)
    stdlib_chars: int = option(STDLIB_CHARS, "symbols read from the standard library when no "
                                             "files are given", ge=1)
    eval_batch_size: int = option(64, "rows evaluated in parallel", ge=1)


@dataclass
class SampleConfig(Options):
    """What the end of a training run prints."""

    prime: str = option("", "text the end-of-run samples start from", empty_ok=True,
                        on_resume=True)
    length: int = option(400, "symbols per end-of-run sample", ge=0, on_resume=True)
    temperature: float = option(0.7, "end-of-run sampling temperature; 0 picks the likeliest "
                                     "symbol", ge=0, on_resume=True)
    top_k: int | None = option(None, "sample among the k likeliest symbols (none: all)", ge=1,
                               on_resume=True)
    count: int = option(2, "samples printed at the end of the run", ge=0, on_resume=True)


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": LMConfig, "train": TrainConfig, "sample": SampleConfig,
}


# the plain `rnnkit train charlm`: a run that visibly learns in about 2–4 minutes on 2 cores
CHARLM_DEFAULTS = {
    "model": {"cell": "lstm", "layers": 1, "hidden": 256, "embedding": 64},
    "train": {"steps": 800, "batch_size": 32, "lr": 3e-3, "eval_every": 100},
}


def default_config() -> dict[str, dict[str, Any]]:
    config = {name: asdict(cls()) for name, cls in SECTIONS.items()}
    del config["model"]["vocab_size"]  # derived from the data
    for section, values in CHARLM_DEFAULTS.items():
        config[section].update(values)
    return config


def split_text(text: str, data: DataConfig) -> tuple[str, str]:
    cut = int(len(text) * (1 - data.valid_fraction))
    valid = text[cut:]
    if data.valid_chars is not None:
        valid = valid[: data.valid_chars]
    return text[:cut], valid


def load_text(data: DataConfig) -> tuple[str, str]:
    """The corpus and a one-line description of where it came from."""
    if data.files:
        return read_files(data.files), ", ".join(data.files)
    text, used = read_stdlib(data.stdlib_chars)
    return text, (f"{len(used)} modules of the Python standard library in {used[0].parent} "
                  f"({used[0].name} … {used[-1].name})")


def loss_over_stream(model: nn.Module, stream: Tensor, seq_len: int) -> tuple[float, int]:
    """Summed cross-entropy (nats) and count over a batchified stream, state carried across."""
    total, count, state = 0.0, 0, None
    device = next(model.parameters()).device
    for w in range(num_windows(stream, seq_len)):
        inputs, targets = (t.to(device) for t in stream_window(stream, w * seq_len, seq_len))
        logits, state = model(inputs, state)
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total, count


def metrics_from(total: float, count: int) -> dict[str, float]:
    nats = total / count
    return {"loss": nats, "bpc": nats / math.log(2)}


class StreamLMTask:
    """Training batches of a language model on one long stream laid out as parallel rows.

    Batch ``index`` is the next ``seq_len`` steps of every row (``train_stream``: (N, B)); the
    recurrent state is carried from one window to the next (truncated BPTT). Shared by the
    character and the word LM tasks, which set ``train_stream``, ``windows`` and ``data``.
    """

    train_stream: Tensor
    windows: int
    data: Any  # has seq_len
    model_config: LMConfig

    def chance_loss(self) -> float:
        """The loss of a uniform guess (the Trainer calls far above it divergence)."""
        return math.log(self.model_config.vocab_size)

    def num_batches(self) -> int:
        return self.windows

    def batch(self, index: int) -> Batch:
        window = index % self.windows
        inputs, targets = stream_window(self.train_stream, window * self.data.seq_len,
                                        self.data.seq_len)
        # a new epoch starts the streams over: the state from the end of the text is dropped
        return Batch(inputs, targets, continues=window > 0)

    valid_stream: Tensor

    def metrics_from_totals(self, totals: dict[str, float]) -> dict[str, float]:
        """Metrics from the summed loss (nats) ``total`` over ``count`` predictions."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate_totals(self, model: nn.Module, rank: int = 0, world_size: int = 1
                        ) -> dict[str, float]:
        """Summed loss and count over rank ``rank``'s rows of the validation streams (all of
        them for one process); the Trainer all-reduces them over the ranks."""
        start, stop = shard_span(int(self.valid_stream.shape[1]), rank, world_size)
        if start == stop:
            return {"total": 0.0, "count": 0.0}
        total, count = loss_over_stream(model, self.valid_stream[:, start:stop], self.data.seq_len)
        return {"total": total, "count": float(count)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.metrics_from_totals(self.evaluate_totals(model))

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        logits, state = model(batch.inputs, state)  # (T, B, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        return StepResult(loss, state, batch.targets.numel())


class CharLMTask(StreamLMTask):
    """The Trainer's view of character LM training: windows of a batchified stream."""

    name = NAME
    loss_unit = "nats/char"  # as describe_metrics prints it; the curves' y-axis says the same

    def __init__(self, vocab: CharVocab, train_text: str, valid_text: str, data: DataConfig,
                 model_config: LMConfig, batch_size: int) -> None:
        self.vocab = vocab
        self.data = data
        self.model_config = model_config
        self.train_stream = batchify(encode_tensor(vocab.encode(train_text, "training text")),
                                     batch_size)  # (N, B)
        valid = encode_tensor(vocab.encode(valid_text, "validation text"))
        self.valid_stream = batchify(valid, evaluation_rows(valid.numel(), data.seq_len,
                                                            data.eval_batch_size))
        self.windows = num_windows(self.train_stream, data.seq_len)

    def metrics_from_totals(self, totals: dict[str, float]) -> dict[str, float]:
        return metrics_from(totals["total"], int(totals["count"]))

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "vocab": self.vocab.to_json(),
                "data": asdict(self.data)}


def build(config: dict[str, dict[str, Any]]) -> tuple[CharLMTask, LanguageModel, str]:
    """Task and freshly initialised model from a resolved config (seed the RNGs first)."""
    data = DataConfig(**config["data"])
    train = TrainConfig.from_dict(config["train"])
    text, source = load_text(data)
    if not text:
        raise ValueError(f"the training data ({source}) is empty")
    vocab = CharVocab.from_text(text, byte_level=data.byte_level)
    sample = config.get("sample", {})
    if sample.get("count") and sample.get("prime"):
        # checked now, not after training: the samples are printed at the end of the run
        vocab.encode(sample["prime"], "sample.prime (--prime)")
    train_text, valid_text = split_text(text, data)
    for name, part in (("training", train_text), ("validation", valid_text)):
        if len(part) < 2 * train.batch_size + 2:
            raise ValueError(f"the {name} text is only {len(part)} symbols ({source}); give more "
                             "data, a smaller --batch-size or another --valid-fraction")
    model_config = LMConfig.from_dict({**config["model"], "vocab_size": len(vocab)})
    task = CharLMTask(vocab, train_text, valid_text, data, model_config, train.batch_size)
    return task, LanguageModel(model_config), source


def load_model(path: str | Path | Checkpoint) -> tuple[LanguageModel, CharVocab, Checkpoint]:
    """The trained model and its vocabulary from a run directory or checkpoint JSON."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: LanguageModel(LMConfig.from_dict(m)), required=("vocab", "data"))
    vocab = from_meta(checkpoint, "task.vocab", lambda: CharVocab.from_json(described["vocab"]))
    check_size(checkpoint, "task.vocab", len(vocab), "vocab_size", model.config.vocab_size)
    from_meta(checkpoint, "task.data", lambda: DataConfig(**described["data"]))  # seq_len > 0, ...
    return model, vocab, checkpoint


@torch.no_grad()
def evaluate_text(model: LanguageModel, vocab: CharVocab, text: str, seq_len: int = 100,
                  batch_size: int = 64, skip_unknown: bool = False) -> dict[str, float]:
    """Nats and bits per symbol of ``text``, as validation scores its text: one stream laid out
    in up to ``batch_size`` rows (:func:`~rnnkit.data.streams.evaluation_rows`).

    With ``skip_unknown`` symbols outside the vocabulary are left out and counted in
    ``"unknown"``; otherwise the first one raises naming it.
    """
    if skip_unknown:
        indices, unknown = vocab.encode_known(text)
    else:
        indices, unknown = vocab.encode(text, "evaluation text"), 0
    if len(indices) < 3:
        raise ValueError(f"the evaluation text has only {len(indices)} known symbols")
    tokens = encode_tensor(indices)
    rows = evaluation_rows(tokens.numel(), seq_len, batch_size)
    model.eval()
    metrics = metrics_from(*loss_over_stream(model, batchify(tokens, rows), seq_len))
    return {**metrics, "symbols": float(tokens.numel()), "unknown": float(unknown)}


def describe_data(task: CharLMTask) -> str:
    return (f"{task.train_stream.numel():,} training and {task.valid_stream.numel():,} "
            f"validation symbols, vocabulary of {len(task.vocab)}")


def report(task: CharLMTask, model: LanguageModel, config: dict[str, Any], out: Path) -> None:
    """What a finished run prints: samples from the weights validation chose."""
    from rnnkit.models.language_model import generate
    from rnnkit.tasks.common import chosen_weights

    which, _ = chosen_weights(model, out)
    print(f"samples, {which}:")
    s, seed = config["sample"], int(config["train"]["seed"])
    for i in range(int(s["count"])):
        text = generate(model, task.vocab, s["prime"], s["length"], s["temperature"],
                        s["top_k"], seed=seed + i)
        print(f"--- sample {i + 1} (temperature {s['temperature']}) ---")
        print(text)
    print("---")


def describe_metrics(valid: dict[str, float]) -> str:
    return f"{valid['loss']:.4f} nats/char, {valid['bpc']:.4f} bits/char"
