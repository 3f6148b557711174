"""Sentiment on the Stanford Sentiment Treebank's parse trees: recursive vs sequential models.

Data: SST with its binarised parse trees (``../shared/data/sst-trees/{train,dev}.txt``), every
node (phrase) labelled 0–4. ``classes: fine`` keeps the five labels; ``classes: binary`` maps 0–1 →
negative and 3–4 → positive and drops neutral phrases (and dev sentences with a neutral root: 872
of the 1,101 remain, the SST-2 dev set).

Models (``model.encoder``):

* ``treelstm`` — the constituency (binary N-ary) Tree-LSTM, ``childsum`` — the child-sum one
  (:mod:`rnnkit.models.tree_lstm`): trained on every labelled node of every training tree;
* any sequence encoder of :func:`~rnnkit.models.recurrent.build_recurrent` (``lstm``, ``gru``,
  ``rnn``, ``mingru``, ``minlstm``, ``tcn``; ``bidirectional`` by default): trained on every
  labelled phrase of the training trees as a word sequence (distinct phrase–label pairs), the
  same supervision the trees get.

Both are scored the same way: the label of each dev sentence (the root), as Tai et al. (2015) do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.data.text import Vocabulary, unescape_ptb
from rnnkit.data.trees import Tree, read_trees
from rnnkit.models.classifier import POOLINGS, ClassifierConfig, SequenceClassifier
from rnnkit.models.recurrent import CELLS, RecurrentConfig
from rnnkit.models.tree_lstm import TreeBatch, TreeClassifier
from rnnkit.options import Options, option
from rnnkit.tasks.common import (
    EpochPlan,
    from_meta,
    load_task_model,
    per_sequence,
    require_full_bptt,
    shared_path,
)
from rnnkit.tasks.sentiment import collate, model_inputs
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch, StepResult

NAME = "trees"
TREE_ENCODERS = {"treelstm": "constituency", "childsum": "childsum"}
ENCODERS = (*TREE_ENCODERS, *CELLS)
LABEL_SETS = {"binary": ["negative", "positive"],
              "fine": ["very negative", "negative", "neutral", "positive", "very positive"]}
IGNORE = -100  # cross_entropy's ignore_index: neutral phrases in the binary task


@dataclass
class TreesDataConfig(Options):
    train: str | None = option(None, "training trees (default: ../shared/data/sst-trees/train.txt)")
    valid: str | None = option(None, "dev trees (default: ../shared/data/sst-trees/dev.txt)")
    classes: str = option("binary", "binary (negative/positive, neutral dropped) or fine (0–4)",
                          choices=tuple(LABEL_SETS))
    lowercase: bool = option(True, "lower-case every word")
    min_count: int = option(1, "training-word frequency below which a word is <unk>", ge=1)
    eval_batch_size: int = option(128, "dev sentences evaluated in parallel", ge=1)


@dataclass
class TreesModelConfig(Options):
    encoder: str = option("treelstm", "treelstm (constituency), childsum, or a sequence encoder "
                                      "trained on every phrase", choices=ENCODERS)
    embedding: int = option(300, "word embedding size", ge=1)
    hidden: int = option(150, "Tree-LSTM memory size, or hidden units per direction", ge=1)
    layers: int = option(1, "sequence encoders: stacked layers (tcn: blocks)", ge=1)
    bidirectional: bool = option(True, "sequence encoders: read both directions")
    dropout: float = option(0.5, "dropout on embeddings and before the output layer", ge=0, lt=1)
    kernel_size: int = option(3, "tcn: kernel size", ge=2)
    pooling: str = option("final", "sequence encoders: final, mean or max", choices=POOLINGS)
    vocab_size: int = option(0, "words in the vocabulary (derived from the data)", ge=0)
    classes: int = option(0, "sentiment classes (derived from data.classes)", ge=0)


SECTIONS: dict[str, type] = {"data": TreesDataConfig, "model": TreesModelConfig, "train": TrainConfig}


def default_config() -> dict[str, dict[str, Any]]:
    train = TrainConfig(steps=6000, batch_size=25, lr=2e-3, eval_every=200, clip_norm=5.0,
                        weight_decay=1e-5, plateau_patience=3, monitor="accuracy", monitor_mode="max")
    model = asdict(TreesModelConfig())
    del model["vocab_size"], model["classes"]
    return {"data": asdict(TreesDataConfig()), "model": model, "train": train.to_dict()}


def label_of(label: int, classes: str) -> int:
    """A node's class index, or IGNORE for a neutral phrase of the binary task."""
    if classes == "fine":
        return label
    return IGNORE if label == 2 else int(label > 2)


def words_of(tree: Tree, lowercase: bool) -> list[str]:
    words = unescape_ptb(tree.leaves())
    return [w.lower() for w in words] if lowercase else words


def relabel(tree: Tree, data: TreesDataConfig) -> Tree:
    """The tree with every label mapped to a class index and every word normalised."""
    mapped: dict[int, Tree] = {}
    for node in tree.nodes():
        word = None
        if node.word is not None:
            word = unescape_ptb([node.word])[0]
            word = word.lower() if data.lowercase else word
        mapped[id(node)] = Tree(label_of(node.label, data.classes), word,
                                tuple(mapped[id(c)] for c in node.children))
    return mapped[id(tree)]


def build_model(config: TreesModelConfig) -> nn.Module:
    if config.encoder in TREE_ENCODERS:
        return TreeClassifier(config.vocab_size, config.embedding, config.hidden, config.classes,
                              TREE_ENCODERS[config.encoder], config.dropout)
    recurrent = RecurrentConfig(cell=config.encoder, layers=config.layers, hidden=config.hidden,
                                bidirectional=config.bidirectional, kernel_size=config.kernel_size)
    return SequenceClassifier(ClassifierConfig(
        classes=config.classes, vocab_size=config.vocab_size, embedding=config.embedding,
        pooling=config.pooling, dropout=config.dropout, recurrent=recurrent))


class TreesTask:
    """The Trainer's view: batches of trees (tree encoders) or of phrases (sequence encoders)."""

    name = NAME

    def __init__(self, train: list[Tree], valid: list[Tree], data: TreesDataConfig,
                 model_config: TreesModelConfig, vocab: Vocabulary, batch_size: int, seed: int) -> None:
        self.data, self.model_config, self.vocab = data, model_config, vocab
        self.labels = LABEL_SETS[data.classes]
        self.trees = model_config.encoder in TREE_ENCODERS
        self.train = train
        # dev sentences scored by their root label (binary: those with a neutral root are dropped)
        self.valid = [tree for tree in valid if tree.label != IGNORE]
        if self.trees:
            self.plan = EpochPlan([sum(1 for _ in t.nodes()) for t in train], batch_size, seed)
        else:
            phrases = sorted({(tuple(words), label) for tree in train
                              for words, label in tree.spans() if label != IGNORE})
            self.phrases = [(vocab.encode(list(words)), label) for words, label in phrases]
            self.plan = EpochPlan([len(ids) for ids, _ in self.phrases], batch_size, seed)
        self.counts = {"train trees": len(train), "dev sentences": len(self.valid),
                       "vocabulary": len(vocab)}

    def num_batches(self) -> int:
        return len(self.plan)

    def tree_batch(self, trees: list[Tree]) -> TreeBatch:
        return TreeBatch.build(trees, self.vocab.index, self.vocab.unk)

    def batch(self, index: int) -> Batch:
        chosen = self.plan.indices(index)
        if self.trees:
            batch = self.tree_batch([self.train[i] for i in chosen])
            # (1, N): the Trainer cuts dim 0 of every tensor to the time span; see per_sequence
            return Batch((per_sequence(batch.labels), batch), per_sequence(batch.labels))
        picked = [self.phrases[i] for i in chosen]
        return collate([(ids, None) for ids, _ in picked], [label for _, label in picked],
                       self.vocab.pad)

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        labels = batch.targets[0]
        logits = model(batch.inputs[1]) if self.trees else model(**model_inputs(batch))
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
        return StepResult(loss, None, int((labels != IGNORE).sum()))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return score_sentences(model, self.valid, self.vocab, self.data.eval_batch_size)

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "data": asdict(self.data),
                "vocab": self.vocab.to_json()}


@torch.no_grad()
def sentence_logits(model: nn.Module, trees: list[Tree], vocab: Vocabulary, batch_size: int) -> Tensor:
    """Logits (S, C) of each tree's whole sentence: the root of a Tree-LSTM, the whole leaf
    sequence of a sequence encoder."""
    model.eval()
    out = []
    for start in range(0, len(trees), batch_size):
        chunk = trees[start:start + batch_size]
        if isinstance(model, TreeClassifier):
            batch = TreeBatch.build(chunk, vocab.index, vocab.unk)
            out.append(model(batch)[batch.roots])
        else:
            ids = [(vocab.encode(tree.leaves()), None) for tree in chunk]
            out.append(model(**model_inputs(collate(ids, [0] * len(ids), vocab.pad))))
    return torch.cat(out)


def score_sentences(model: nn.Module, trees: list[Tree], vocab: Vocabulary, batch_size: int
                    ) -> dict[str, float]:
    """Loss and accuracy of the sentence (root) labels of ``trees`` (relabelled, neutral roots of
    the binary task already dropped): what validation reports and ``rnnkit evaluate`` prints."""
    logits = sentence_logits(model, trees, vocab, batch_size)
    references = torch.tensor([tree.label for tree in trees])
    return {"loss": float(F.cross_entropy(logits, references)),
            "accuracy": float((logits.argmax(-1) == references).float().mean())}


def build(config: dict[str, dict[str, Any]]) -> tuple[TreesTask, nn.Module, str]:
    """Task and a fresh model from a resolved config (seed the RNGs first)."""
    data = TreesDataConfig.from_dict(config["data"])
    train_config = TrainConfig.from_dict(config["train"])
    require_full_bptt(train_config, NAME)
    paths = [shared_path(f"sst-trees/{split}.txt", configured)
             for split, configured in (("train", data.train), ("dev", data.valid))]
    train, valid = ([relabel(tree, data) for tree in read_trees(path)] for path in paths)
    vocab = Vocabulary.build((tree.leaves() for tree in train), min_freq=data.min_count)
    model_config = TreesModelConfig.from_dict({**config["model"], "vocab_size": len(vocab),
                                               "classes": len(LABEL_SETS[data.classes])})
    task = TreesTask(train, valid, data, model_config, vocab, train_config.batch_size, train_config.seed)
    source = (f"{paths[0]} ({len(train)} trees), {paths[1]} ({len(task.valid)} {data.classes} "
              f"dev sentences); vocabulary {len(vocab)}")
    return task, build_model(model_config), source


def load_model(path: str | Path) -> tuple[nn.Module, TreesDataConfig, Vocabulary, Checkpoint]:
    """The trained model, its data options and vocabulary from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: build_model(TreesModelConfig.from_dict(m)), required=("data", "vocab"))
    data = from_meta(checkpoint, "task.data", lambda: TreesDataConfig.from_dict(described["data"]))
    vocab = from_meta(checkpoint, "task.vocab", lambda: Vocabulary.from_json(described["vocab"]))
    return model, data, vocab, checkpoint
