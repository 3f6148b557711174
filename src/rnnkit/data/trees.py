"""Labelled constituency trees in the Stanford Sentiment Treebank's bracket form.

One tree per line: ``(label word)`` is a leaf (a word may hold spaces: ``(2 8 1\\/2)``),
``(label child child …)`` an inner node, every node (phrase) labelled 0–4 (very negative … very
positive). Tokens are PTB-escaped (``-LRB-``, ``\\/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rnnkit.data.text import FormatError


@dataclass(frozen=True)
class Tree:
    """A labelled node: a leaf has a ``word`` and no children."""

    label: int
    word: str | None = None
    children: tuple[Tree, ...] = ()

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def nodes(self) -> Iterator[Tree]:
        """Every node, children before their parent (post-order), without recursion."""
        stack: list[tuple[Tree, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded or node.is_leaf:
                yield node
            else:
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(node.children))

    def leaves(self) -> list[str]:
        return [node.word for node in self.nodes() if node.word is not None]

    def spans(self) -> Iterator[tuple[list[str], int]]:
        """(words, label) of every phrase, the sentence last."""
        words: dict[int, list[str]] = {}
        for node in self.nodes():
            words[id(node)] = ([node.word] if node.word is not None
                               else [w for child in node.children for w in words[id(child)]])
            yield words[id(node)], node.label


def parse_tree(text: str, where: str = "tree") -> Tree:
    """One bracketed tree; a malformed one raises ValueError naming ``where`` and the offset."""
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    stack: list[tuple[int, list[Tree | str]]] = []
    root: Tree | None = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "(":
            if root is not None:
                raise ValueError(f"{where}: text after the end of the tree")
            if i + 1 >= len(tokens) or not tokens[i + 1].lstrip("-").isdigit():
                raise ValueError(f"{where}: '(' must be followed by an integer label")
            stack.append((int(tokens[i + 1]), []))
            i += 2
            continue
        if token == ")":
            if not stack:
                raise ValueError(f"{where}: unbalanced ')'")
            label, parts = stack.pop()
            words = [p for p in parts if isinstance(p, str)]
            kids = [p for p in parts if isinstance(p, Tree)]
            if words and kids:
                raise ValueError(f"{where}: a node holds either a word or subtrees, got {parts}")
            if not parts:
                raise ValueError(f"{where}: an empty node")
            # a leaf of several tokens is one word with spaces: SST has "(2 8 1\/2)", the film
            node = Tree(label, " ".join(words)) if words else Tree(label, None, tuple(kids))
            if stack:
                stack[-1][1].append(node)
            else:
                root = node
        else:
            if not stack:
                raise ValueError(f"{where}: word {token!r} outside any node")
            stack[-1][1].append(token)
        i += 1
    if stack or root is None:
        raise ValueError(f"{where}: unbalanced '(' (the tree does not close)")
    return root


def read_trees(path: str | Path) -> list[Tree]:
    """Every tree of a file, one per non-empty line; a malformed line raises naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    trees = []
    with path.open(encoding="utf-8-sig") as lines:  # a byte-order mark is no part of the tree
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                trees.append(parse_tree(line, f"{path}:{number}"))
            except ValueError as exc:
                raise FormatError(path, number, str(exc).split(": ", 1)[-1]) from None
    if not trees:
        raise FormatError(path, None, "no trees")
    return trees
