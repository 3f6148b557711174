"""Word-level language modelling on the Penn Treebank: Zaremba et al. 2014's "small" preset.

Data: Mikolov's PTB text (``../shared/data/ptb/ptb.{train,valid}.txt`` by default): one sentence
per line, already limited to a 10k vocabulary with ``<unk>``; every line ends with ``<eos>``.
The text is one stream laid out as ``batch_size`` parallel rows (charlm's machinery,
:mod:`rnnkit.data.streams`); each training batch is the next ``seq_len`` steps of every row and
the LSTM state is carried from one window to the next (truncated BPTT over 35 steps).

The preset (Zaremba, Sutskever & Vinyals 2014, "small"): 2 × 200 LSTM, 200-d embeddings, no
dropout, weights uniform in ±0.1, SGD at learning rate 1, gradient norm clipped at 5, batch 20,
35 steps, 13 epochs. Their loss is summed over the 35 steps, ours averaged, so the same updates
are learning rate 35 with clipping at 5/35 here. Their schedule keeps the rate for four epochs
and then halves it at every epoch: the Trainer's "step" schedule, evaluated once per epoch.
Their reported validation perplexity is 120.7.

Other presets are config files (``rnnkit train wordlm --config FILE``): ``examples/ptb-medium.yaml``
is their "medium" (2 × 650, dropout 0.5, ±0.05, 39 epochs, the rate kept 6 epochs then divided
by 1.2 per epoch; 86.2 reported), ``examples/ptb-90min.yaml`` a tied, regularised model with the
Trainer's "budget" schedule, chosen for a 90-minute budget on one thread (docs/results.md).

Metric: perplexity exp(mean cross-entropy per word) on the validation text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.data.streams import batchify, encode_tensor, evaluation_rows, num_windows
from rnnkit.data.text import Vocabulary, read_lines
from rnnkit.models.language_model import LanguageModel, LMConfig, continue_streams, seeded_generator
from rnnkit.options import Options, option
from rnnkit.tasks.charlm import StreamLMTask, loss_over_stream
from rnnkit.tasks.common import check_size, from_meta, load_task_model, shared_path
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig

NAME = "wordlm"
EOS = "<eos>"
PTB_WINDOWS = 1328  # 929,589 training words / (20 rows · 35 steps): one epoch of the preset


@dataclass
class WordLMDataConfig(Options):
    train: str | None = option(None, "training text, one sentence per line (none: "
                                     "../shared/data/ptb/ptb.train.txt)", metavar="PATH")
    valid: str | None = option(None, "validation text (none: ../shared/data/ptb/ptb.valid.txt)",
                               metavar="PATH")
    seq_len: int = option(35, "time steps per training batch", ge=1)
    eval_batch_size: int = option(10, "rows evaluated in parallel", ge=1)
    init_scale: float | None = option(0.1, "every weight uniform in ±init_scale (none: the "
                                           "layers' defaults)", gt=0)
    max_train_words: int | None = option(None, "the first N training words only (quick "
                                               "experiments)", ge=1)


SECTIONS: dict[str, type] = {"data": WordLMDataConfig, "model": LMConfig, "train": TrainConfig}


def default_config() -> dict[str, dict[str, Any]]:
    model = LMConfig(vocab_size=1, cell="lstm", layers=2, hidden=200, embedding=200, dropout=0.0)
    # Zaremba et al.'s loss is summed over the 35 steps (and averaged over the batch); a Task's
    # loss is the mean per word, 35× smaller, and so is its gradient. Learning rate 1 with norm
    # clipping at 5 on their scale is exactly learning rate 35 with clipping at 5/35 on ours.
    steps = WordLMDataConfig().seq_len
    train = TrainConfig(steps=13 * PTB_WINDOWS, batch_size=20, optimizer="sgd", lr=1.0 * steps,
                        clip_norm=5.0 / steps, schedule="step", decay_factor=0.5, decay_after=4,
                        eval_every=PTB_WINDOWS)
    model_dict = model.to_dict()
    del model_dict["vocab_size"]  # derived from the data
    return {"data": asdict(WordLMDataConfig()), "model": model_dict, "train": train.to_dict()}


def read_words(path: Path) -> tuple[list[str], str]:
    """The words of a PTB-style file, ``<eos>`` after every sentence."""
    sentences, summary = read_lines(path)
    return [word for sentence in sentences for word in (*sentence, EOS)], str(summary)


def encode(vocab: Vocabulary, words: list[str], what: str) -> Tensor:
    try:
        return encode_tensor(vocab.encode(words))
    except KeyError as error:
        raise ValueError(f"the {what} has a word outside the training vocabulary, which has no "
                         f"<unk>: {error.args[0]}") from None


class WordLMTask(StreamLMTask):
    """The Trainer's view of word-level LM training: windows of a batchified stream."""

    name = NAME
    loss_unit = "nats/word"  # as describe_metrics prints it; the curves' y-axis says the same

    def __init__(self, vocab: Vocabulary, train: Tensor, valid: Tensor, data: WordLMDataConfig,
                 model_config: LMConfig, batch_size: int) -> None:
        self.vocab, self.data, self.model_config = vocab, data, model_config
        self.train_stream = batchify(train, batch_size)  # (N, B)
        self.valid_stream = batchify(valid, evaluation_rows(valid.numel(), data.seq_len,
                                                            data.eval_batch_size))
        self.windows = num_windows(self.train_stream, data.seq_len)
        self.counts = {"train words": train.numel(), "valid words": valid.numel(),
                       "vocabulary": len(vocab)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return stream_metrics(model, self.valid_stream, self.data.seq_len)

    def metrics_from_totals(self, totals: dict[str, float]) -> dict[str, float]:
        nats = totals["total"] / totals["count"]
        return {"loss": nats, "ppl": math.exp(nats)}

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "data": asdict(self.data),
                "vocab": self.vocab.to_json()}


@torch.no_grad()
def stream_metrics(model: nn.Module, stream: Tensor, seq_len: int) -> dict[str, float]:
    """Mean cross-entropy per word (nats) and perplexity of a batchified stream (N, B)."""
    model.eval()
    total, count = loss_over_stream(model, stream, seq_len)
    return {"loss": total / count, "ppl": math.exp(total / count)}


def init_uniform(model: nn.Module, scale: float) -> None:
    """Every parameter uniform in ±scale, as Zaremba et al. initialise."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-scale, scale)


def build(config: dict[str, dict[str, Any]]) -> tuple[WordLMTask, LanguageModel, str]:
    """Task and a fresh model from a resolved config (seed the RNGs first)."""
    data = WordLMDataConfig(**config["data"])
    train_config = TrainConfig.from_dict(config["train"])
    train_words, train_summary = read_words(shared_path("ptb/ptb.train.txt", data.train))
    valid_words, valid_summary = read_words(shared_path("ptb/ptb.valid.txt", data.valid))
    if data.max_train_words is not None:
        train_words = train_words[: data.max_train_words]
    # no added specials: PTB brings its own <unk>, and <eos> is an ordinary word here
    vocab = Vocabulary.build([train_words], specials=())
    model_config = LMConfig.from_dict({**config["model"], "vocab_size": len(vocab)})
    task = WordLMTask(vocab, encode(vocab, train_words, "training text"),
                      encode(vocab, valid_words, "validation text"), data, model_config,
                      train_config.batch_size)
    model = LanguageModel(model_config)
    if data.init_scale is not None:
        init_uniform(model, data.init_scale)
    return task, model, f"{train_summary}; {valid_summary}"


def load_model(path: str | Path | Checkpoint) -> tuple[LanguageModel, Vocabulary, Checkpoint]:
    """The trained model and its vocabulary from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: LanguageModel(LMConfig.from_dict(m)), required=("vocab",))
    vocab = from_meta(checkpoint, "task.vocab", lambda: Vocabulary.from_json(described["vocab"]))
    check_size(checkpoint, "task.vocab", len(vocab), "vocab_size", model.config.vocab_size)
    return model, vocab, checkpoint


def perplexity(model: LanguageModel, vocab: Vocabulary, path: str | Path, seq_len: int = 35,
               batch_size: int = 10) -> float:
    """Perplexity of a PTB-style text file under the model (unknown words → ``<unk>``), laid
    out in rows as validation lays out its text."""
    words, _ = read_words(Path(path))
    stream = encode(vocab, words, f"text {path}")
    rows = evaluation_rows(stream.numel(), seq_len, batch_size)
    return stream_metrics(model, batchify(stream, rows), seq_len)["ppl"]


def sample(model: LanguageModel, vocab: Vocabulary, prime: list[str], words: int = 30,
           temperature: float = 1.0, seed: int = 0) -> list[str]:
    """The prime followed by ``words`` sampled words (the prime read once, the state carried)."""
    ids = vocab.encode(prime or [EOS])
    out = continue_streams(model, [ids], words, temperature, None, [seeded_generator(seed)])
    return [*prime, *vocab.decode(out[0], strip_specials=False)]


def describe_metrics(valid: dict[str, float]) -> str:
    return f"perplexity {valid['ppl']:.2f}, {valid['loss']:.4f} nats/word"


def report(task: WordLMTask, model: LanguageModel, config: dict[str, Any], out: Path) -> None:
    """What a finished run prints: a few sentences sampled from the weights validation chose."""
    from rnnkit.tasks.common import chosen_weights

    which, _ = chosen_weights(model, out)
    print(f"samples, {which}:")
    seed = int(config["train"].get("seed", 0))
    for i in range(3):
        words = sample(model, task.vocab, [], words=25, temperature=1.0, seed=seed + i)
        print("  " + " ".join(words).replace(f" {EOS} ", " / ").replace(EOS, "/").strip())

