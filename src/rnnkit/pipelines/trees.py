"""The trees pipeline: a parse tree (or, for sequence encoders, a sentence) in, its sentiment out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from rnnkit.data.text import tokenize_text
from rnnkit.data.trees import Tree, parse_tree, read_trees
from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.pipelines.sentiment import Classification
from rnnkit.tasks import trees


class TreesPipeline(Pipeline):
    """Input: a bracketed parse tree as in the SST files (``(3 (2 It) (4 (2 's) (4 great)))``; the
    labels in it are ignored) — or, for a model with a sequence encoder, a plain sentence too.
    Result: :class:`~rnnkit.pipelines.sentiment.Classification` of the whole sentence."""

    task = trees.NAME

    def _load(self) -> nn.Module:
        model, self.data, self.vocab, _ = trees.load_model(self.checkpoint)
        self.labels = trees.LABEL_SETS[self.data.classes]
        return model

    def _tree(self, text: Any, number: int) -> Tree:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"input {number} ({shown(text)}): give a parse tree or a sentence")
        if text.lstrip().startswith("("):
            try:
                tree = parse_tree(text, f"input {number}")
            except ValueError as error:
                raise InputError(str(error)) from None
        elif isinstance(self.module, trees.TreeClassifier):
            raise InputError(f"input {number}: this {self.described['model']['encoder']} model "
                             "reads parse trees, e.g. (2 (2 a) (2 film)); got a plain sentence")
        else:  # a sequence encoder reads the words alone: a flat tree carries them
            # tokenised as the treebank's leaves are ("it's great!" → it 's great !), so a typed
            # sentence reads the words the model knows, not "it's" and "great!"
            words = tokenize_text(text, self.vocab)
            if not words:
                raise InputError(f"input {number} ({shown(text)}): give a parse tree or a "
                                 "sentence")
            tree = Tree(0, None, tuple(Tree(0, word) for word in words)) if len(words) > 1 else \
                Tree(0, words[0])
        return trees.relabel(tree, self.data)

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        parsed = [self._tree(text, first_index + i + 1) for i, text in enumerate(batch)]
        probs = trees.sentence_logits(self.module, parsed, self.vocab, len(parsed)).softmax(-1)
        results: list[Result] = []
        for text, tree, row in zip(batch, parsed, probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            tokens = tree.leaves()
            unknown = [t for t in tokens if t not in self.vocab]
            results.append(Classification(text, tokens, self.labels[best], row[best],
                                          dict(zip(self.labels, row)), unknown))
        return results

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """Loss and sentence accuracy of a file of labelled trees (the SST format)."""
        relabelled = [trees.relabel(tree, self.data) for tree in read_trees(path)]
        scored = [tree for tree in relabelled if tree.label != trees.IGNORE]
        if not scored:
            raise InputError(f"{path}: no tree has a {self.data.classes} sentence label")
        metrics = trees.score_sentences(self.module, scored, self.vocab,
                                        batch_size or self.data.eval_batch_size)
        return {**metrics, "sentences": float(len(scored))}

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        return (f"sentence accuracy {100 * metrics['accuracy']:.2f}%, loss {metrics['loss']:.4f} "
                f"({int(metrics['sentences'])} {self.data.classes} sentences)")
