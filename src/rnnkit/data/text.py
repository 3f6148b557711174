"""Word-level text data: a vocabulary, readers for the common corpus layouts, bucketed batches.

Readers share two rules:

* malformed input raises :class:`FormatError` naming the file and the (1-based) line, so a
  broken corpus is fixed rather than half-used;
* lines that are legitimately not examples (blank lines, ``-DOCSTART-``, a header) are skipped
  *and counted* in the returned :class:`ReadSummary`, so nothing is dropped silently.

Layouts: plain whitespace-tokenised lines (language models), CoNLL columns (tagging), the ATIS
``seq.in`` / ``seq.out`` / ``label`` triple (joint slot tagging and intent), ``source<TAB>target``
pairs and two line-aligned files (translation), and ``label<TAB>sentence`` with a header (SST-2).

Example::

    >>> vocab = Vocabulary.build([["a", "b", "a"]], min_freq=2)
    >>> vocab.encode(["a", "b"], eos=True)
    [4, 1, 3]
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)


class FormatError(ValueError):
    """Malformed input; the message names the file and line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


# --- vocabulary ----------------------------------------------------------------------------


class Vocabulary:
    """Tokens in index order; the special tokens (by default ``<pad> <unk> <s> </s>``) come first.

    Without ``<unk>`` among the specials (e.g. a tag set) an unknown token raises instead of
    mapping to ``<unk>``, because a tag that silently becomes "unknown" corrupts the labels.
    """

    def __init__(self, tokens: Sequence[str], specials: Sequence[str] = SPECIALS) -> None:
        self.specials = tuple(specials)
        self.tokens: list[str] = list(self.specials) + [t for t in tokens if t not in self.specials]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be distinct")

    @classmethod
    def build(
        cls,
        sequences: Iterable[Sequence[str]],
        min_freq: int = 1,
        max_size: int | None = None,
        specials: Sequence[str] = SPECIALS,
    ) -> Vocabulary:
        """Tokens seen at least ``min_freq`` times, most frequent first (ties alphabetical)."""
        counts: Counter[str] = Counter()
        for sequence in sequences:
            counts.update(sequence)
        # sorting by (-count, token) makes the index order independent of reading order
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max(0, max_size - len(specials))]
        return cls(kept, specials)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    @functools.cached_property
    def uncased(self) -> bool:
        """Every token is in lower case (a lower-cased corpus: PTB, ATIS, SST-2), so a typed
        "Boston" means its "boston"; in a cased one (CoNLL, SST trees) the capital is data."""
        return all(token == token.lower() for token in self.tokens)

    def _special(self, token: str) -> int:
        if token not in self.index:
            raise KeyError(f"this vocabulary has no {token} token (specials: {self.specials})")
        return self.index[token]

    @property
    def pad(self) -> int:
        return self._special(PAD)

    @property
    def unk(self) -> int:
        return self._special(UNK)

    @property
    def bos(self) -> int:
        return self._special(BOS)

    @property
    def eos(self) -> int:
        return self._special(EOS)

    def encode(self, tokens: Sequence[str], bos: bool = False, eos: bool = False) -> list[int]:
        unk = self.index.get(UNK)
        ids = []
        for token in tokens:
            i = self.index.get(token, unk)
            if i is None:
                raise KeyError(f"{token!r} is not in the vocabulary of {len(self)} tokens "
                               "(and it has no <unk>)")
            ids.append(i)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def decode(self, ids: Iterable[int], strip_specials: bool = True) -> list[str]:
        """Tokens of ``ids``; with ``strip_specials`` stops at ``</s>`` and drops pad/bos."""
        out = []
        for i in ids:
            token = self.tokens[int(i)]
            if strip_specials and token == EOS:
                break
            if strip_specials and token in (PAD, BOS):
                continue
            out.append(token)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"specials": list(self.specials), "tokens": self.tokens[len(self.specials):]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(data["tokens"], data["specials"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


# --- readers -------------------------------------------------------------------------------


@dataclass
class ReadSummary:
    """What a reader did: examples returned and, by reason, lines skipped (never silently)."""

    path: str
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def skipped_lines(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.path}: {self.examples} examples" + (f"; skipped {parts}" if parts else "")


def missing_data_file(path: Path) -> OSError:
    """The error for a data path that is not a file: a folder is named as one (an existing
    folder said to "not exist" sends the user looking in the wrong place)."""
    if path.is_dir():
        return IsADirectoryError(f"data path {path} is a folder, and this reader takes one "
                                 "file in the task's format")
    return FileNotFoundError(f"data file {path} does not exist")


def _lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise missing_data_file(path)
    try:
        # utf-8-sig: the byte-order mark editors on Windows write is not part of the first word
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise FormatError(path, None, f"not UTF-8 text ({error})") from None
    # splitlines() would also split on \x0b, \x1c, U+2028 …, which can occur inside real text
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _tokens(text: str, lowercase: bool) -> list[str]:
    return (text.lower() if lowercase else text).split()


# Penn Treebank tokenisers escape brackets and slashes; corpora differ in whether they undo it
# (SST-2's dev sentences say "-lrb-" and "\\/" where its training phrases say "(" and "/")
PTB_ESCAPES = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}"}


def unescape_ptb(tokens: Sequence[str]) -> list[str]:
    """Tokens with Penn Treebank escapes (``-LRB-``, ``\\/``, ``\\*``) turned back into characters."""
    out = []
    for token in tokens:
        token = PTB_ESCAPES.get(token.lower(), token)
        out.append(token.replace("\\/", "/").replace("\\*", "*"))
    return out


def read_lines(path: str | Path, lowercase: bool = False) -> tuple[list[list[str]], ReadSummary]:
    """One whitespace-tokenised sentence per line; blank lines are skipped and counted."""
    summary = ReadSummary(str(path))
    sentences = []
    for line in _lines(path):
        tokens = _tokens(line, lowercase)
        if not tokens:
            summary.skip("blank lines")
            continue
        sentences.append(tokens)
    summary.examples = len(sentences)
    return sentences, summary


def read_conll(
    path: str | Path,
    token_column: int = 0,
    tag_column: int = -1,
    separator: str | None = None,
    lowercase: bool = False,
) -> tuple[list[tuple[list[str], list[str]]], ReadSummary]:
    """Sentences of CoNLL columns: one token per line, sentences separated by blank lines.

    ``separator`` None splits on any whitespace (CoNLL-2003); ``"\\t"`` for TSV columns.
    ``-DOCSTART-`` lines and extra blank lines are skipped and counted.
    """
    summary = ReadSummary(str(path))
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    needed = max(token_column if token_column >= 0 else -token_column - 1,
                 tag_column if tag_column >= 0 else -tag_column - 1) + 1
    lines = _lines(path)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            else:
                summary.skip("extra blank lines")
            continue
        columns = line.split(separator) if separator is not None else line.split()
        if columns[0] == "-DOCSTART-":
            summary.skip("-DOCSTART- lines")
            continue
        if len(columns) < needed:
            raise FormatError(path, number, f"expected at least {needed} columns (token column "
                              f"{token_column}, tag column {tag_column}), found {len(columns)}: "
                              f"{line!r}")
        if len(columns) < 2:
            raise FormatError(path, number, f"a token line needs a token and a tag, got {line!r}")
        tokens.append(columns[token_column].lower() if lowercase else columns[token_column])
        tags.append(columns[tag_column])
    if tokens:
        sentences.append((tokens, tags))
    summary.examples = len(sentences)
    return sentences, summary


def read_atis(
    folder: str | Path, lowercase: bool = False
) -> tuple[list[tuple[list[str], list[str], str]], ReadSummary]:
    """``(tokens, slot tags, intent)`` per utterance from ``seq.in``, ``seq.out`` and ``label``."""
    folder = Path(folder)
    names = ("seq.in", "seq.out", "label")
    files = [_lines(folder / name) for name in names]
    counts = [len(lines) for lines in files]
    if len(set(counts)) != 1:
        detail = ", ".join(f"{name}: {n}" for name, n in zip(names, counts))
        raise FormatError(folder, None, f"the three files must have one line per utterance ({detail})")
    summary = ReadSummary(str(folder))
    examples = []
    for number, (text, tag_line, label) in enumerate(zip(*files), start=1):
        tokens, tags, label = _tokens(text, lowercase), tag_line.split(), label.strip()
        if not tokens and not tags and not label:
            summary.skip("blank lines")
            continue
        if not tokens:
            raise FormatError(folder / "seq.in", number, "empty utterance")
        if len(tokens) != len(tags):
            raise FormatError(folder / "seq.out", number, f"{len(tags)} tags for the {len(tokens)} "
                              f"tokens of seq.in line {number}")
        if not label or len(label.split()) != 1:
            raise FormatError(folder / "label", number, f"expected one intent label, got {label!r}")
        examples.append((tokens, tags, label))
    summary.examples = len(examples)
    return examples, summary


def read_tsv_pairs(
    path: str | Path, lowercase: bool = False
) -> tuple[list[tuple[list[str], list[str]]], ReadSummary]:
    """``source<TAB>target`` per line, both sides whitespace-tokenised; blank lines counted."""
    summary = ReadSummary(str(path))
    pairs = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            summary.skip("blank lines")
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            found = "no tab" if len(parts) == 1 else f"{len(parts) - 1} tabs"
            raise FormatError(path, number, f"expected source<TAB>target, found {found}")
        source, target = _tokens(parts[0], lowercase), _tokens(parts[1], lowercase)
        if not source or not target:
            side = "source" if not source else "target"
            raise FormatError(path, number, f"empty {side} side")
        pairs.append((source, target))
    summary.examples = len(pairs)
    return pairs, summary


def read_parallel(
    source_path: str | Path, target_path: str | Path, lowercase: bool = False
) -> tuple[list[tuple[list[str], list[str]]], ReadSummary]:
    """Line-aligned files (Multi30k ``train.de`` / ``train.en``); lines blank on both sides counted."""
    sources, targets = _lines(source_path), _lines(target_path)
    if len(sources) != len(targets):
        raise FormatError(target_path, None, f"{len(targets)} lines, but {source_path} has "
                          f"{len(sources)}; the files must be line-aligned")
    summary = ReadSummary(f"{source_path} + {target_path}")
    pairs = []
    for number, (s, t) in enumerate(zip(sources, targets), start=1):
        source, target = _tokens(s, lowercase), _tokens(t, lowercase)
        if not source and not target:
            summary.skip("blank lines")
            continue
        if not source or not target:
            raise FormatError(source_path if not source else target_path, number,
                              "empty line whose translation is not empty")
        pairs.append((source, target))
    summary.examples = len(pairs)
    return pairs, summary


LABEL_COLUMNS = ("label", "labels", "sentiment", "polarity", "class", "target")
TEXT_COLUMNS = ("sentence", "content", "text", "review", "phrase", "document", "sentence1")


def read_labelled_tsv(
    path: str | Path,
    label_column: str | Sequence[str] = LABEL_COLUMNS,
    text_column: str | Sequence[str] = TEXT_COLUMNS,
    lowercase: bool = False,
) -> tuple[list[tuple[list[str], str]], ReadSummary]:
    """``(tokens, label)`` from a TSV whose header names the columns (SST-2: ``label<TAB>sentence``).

    Columns are found by their role, in any order and case: the first header name among
    ``label_column`` holds the label, the first among ``text_column`` the text (the shared SST-2
    copy says ``sentence`` in train.tsv but ``content`` in dev.tsv).
    """
    lines = _lines(path)
    if not lines:
        raise FormatError(path, None, "empty file (expected a header line)")
    header = lines[0].split("\t")
    lowered = [name.strip().lower() for name in header]
    label_names = [label_column] if isinstance(label_column, str) else list(label_column)
    text_names = [text_column] if isinstance(text_column, str) else list(text_column)
    label_name = next((name for name in label_names if name in lowered), None)
    text_name = next((name for name in text_names if name in lowered), None)
    if label_name is None or text_name is None:
        names = label_names if label_name is None else text_names
        raise FormatError(path, 1, f"header {header} lacks a column named {' or '.join(names)}")
    label_at, text_at = lowered.index(label_name), lowered.index(text_name)
    summary = ReadSummary(str(path))
    summary.skip("header lines")
    examples = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            summary.skip("blank lines")
            continue
        columns = line.split("\t")
        if len(columns) != len(header):
            raise FormatError(path, number, f"expected {len(header)} tab-separated columns "
                              f"{header}, found {len(columns)}")
        tokens, label = _tokens(columns[text_at], lowercase), columns[label_at].strip()
        if not label:
            raise FormatError(path, number, "empty label")
        if not tokens:
            raise FormatError(path, number, "empty sentence")
        examples.append((tokens, label))
    summary.examples = len(examples)
    return examples, summary


# --- batching ------------------------------------------------------------------------------


def bucket_batches(
    lengths: Sequence[int],
    batch_size: int,
    bucket_size: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> list[list[int]]:
    """Batches of example indices of similar length, so little compute is spent on padding.

    Indices are shuffled (with ``seed``), cut into buckets of ``bucket_size`` (default 50
    batches' worth), sorted by length (longest first) within each bucket and cut into batches;
    the batch order is then shuffled. Without ``shuffle`` everything is sorted by length:
    deterministic evaluation order. Every index appears in exactly one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    indices = list(range(len(lengths)))
    if not shuffle:
        indices.sort(key=lambda i: -lengths[i])
        return [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(indices)
    bucket_size = bucket_size or 50 * batch_size
    batches = []
    for start in range(0, len(indices), bucket_size):
        bucket = sorted(indices[start: start + bucket_size], key=lambda i: -lengths[i])
        batches.extend(bucket[i: i + batch_size] for i in range(0, len(bucket), batch_size))
    rng.shuffle(batches)
    return batches


def pad_sequences(sequences: Sequence[Sequence[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """Time-major ``(T, B)`` int64 padded with ``pad``, and lengths ``(B,)``."""
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    out = torch.full((int(lengths.max()), len(sequences)), pad, dtype=torch.int64)  # (T, B)
    for b, sequence in enumerate(sequences):
        out[: len(sequence), b] = torch.as_tensor(list(sequence), dtype=torch.int64)
    return out, lengths


def pad_characters(
    words: Sequence[Sequence[Sequence[int]]], pad: int = 0
) -> tuple[Tensor, Tensor]:
    """Characters of each word of each sentence: ``(T, B, W)`` int64 and word lengths ``(T, B)``.

    ``words[b][t]`` is the character ids of word t of sentence b; padding words have length 0.
    """
    steps = max(len(sentence) for sentence in words)
    width = max((len(w) for sentence in words for w in sentence), default=1)
    out = torch.full((steps, len(words), max(width, 1)), pad, dtype=torch.int64)  # (T, B, W)
    lengths = torch.zeros(steps, len(words), dtype=torch.int64)  # (T, B)
    for b, sentence in enumerate(words):
        for t, word in enumerate(sentence):
            out[t, b, : len(word)] = torch.as_tensor(list(word), dtype=torch.int64)
            lengths[t, b] = len(word)
    return out, lengths


# --- raw text → tokens as the corpora were tokenised ----------------------------------------

_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_LEADING = "\"'`([{¿¡«“‘"
_TRAILING = ".,!?;:)]}\"'»”’"
_WHOLE = {"n't", "'s", "'re", "'ve", "'ll", "'d", "'m", "``", "''", "--", "...", "-lrb-", "-rrb-"}


def _split_token(token: str) -> list[str]:
    """One whitespace token → the Penn Treebank pieces: quotes, brackets and sentence punctuation
    come off its ends, clitics ("n't", "'s", "'re", ...) off its stem; "..." stays whole."""
    if token.lower() in _WHOLE:  # a clitic or treebank symbol already on its own
        return [token]
    before: list[str] = []
    after: list[str] = []
    while len(token) > 1 and token[0] in _LEADING:
        before.append(token[0])
        token = token[1:]
    while len(token) > 1 and token[-1] in _TRAILING:
        if token.endswith("..."):
            after.insert(0, "...")
            token = token[:-3]
            continue
        after.insert(0, token[-1])
        token = token[:-1]
    middle = [token] if token else []
    match = _CONTRACTION.match(token)
    if match and match[1]:
        middle = [match[1], match[2]]
    return [*before, *middle, *after]


def tokenize_text(text: str, known: Container[str] | None = None, lowercase: bool = False,
                  fold_case: bool = True) -> list[str]:
    """Raw text → tokens the way the treebank-style corpora (SST, CoNLL, PTB) are tokenised:
    "I loved it!" → ["I", "loved", "it", "!"], "don't" → ["do", "n't"]. A whitespace token the
    vocabulary ``known`` already holds ("st.", "U.S.", "3.50") is kept whole, so text that is
    already tokenised stays as it is; a token ``known`` lacks but holds in lower case ("The" for
    the lower-cased PTB or ATIS) is read in lower case, unless ``fold_case`` is False (a cased
    corpus, where the capital is what a tagger reads: "Road" is not "road")."""
    if lowercase:
        text = text.lower()
    tokens: list[str] = []
    for token in text.split():
        tokens += [token] if known is not None and token in known else _split_token(token)
    if known is None or not fold_case:
        return tokens
    return [t.lower() if t not in known and t.lower() in known else t for t in tokens]
