"""CoNLL column data for tagging: telling the format of a path, tag schemes, word keys.

The sentences themselves are read by :func:`rnnkit.data.text.read_conll` (one ``token ... tag``
line per token, blank lines between sentences, ``-DOCSTART-`` lines skipped). This module adds
what NER training on CoNLL-2003 needs around it:

* :func:`detect_format`: an ATIS folder (``seq.in``/``seq.out``/``label``) or a CoNLL file, or
  one line saying why a path is neither;
* tag schemes. CoNLL-2003 is written in **IOB1**: ``I-X`` begins an entity unless it follows
  an entity of type X, and ``B-X`` appears only where one entity of type X directly follows
  another. **IOB2** (BIO) starts every entity with ``B-``; **IOBES** also marks an entity's
  last token ``E-`` and one-token entities ``S-``. All three describe the same chunks (as
  conlleval reads them, :func:`rnnkit.metrics.entities.get_entities`), so a sentence converts
  from one to another by reading its chunks and writing them again (:func:`convert`). Training
  on IOBES and scoring after converting the predictions back to the data's own scheme is the
  usual recipe (Lample et al. 2016, §4.1; Ratinov & Roth 2009);
* :func:`word_key`: the form a word has in the word vocabulary (lower-cased, digits as 0), while
  a character model still reads it as written (Lample et al. 2016 keep case for the characters).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from rnnkit.data.text import missing_data_file
from rnnkit.metrics.entities import Entity, get_entities

FORMATS = ("atis", "conll")
SCHEMES = ("iob1", "iob2", "iobes")
ATIS_FILES = ("seq.in", "seq.out", "label")
SNIFF_LINES = 50  # lines read to tell a file's format: the first token lines decide
_TAG = re.compile(r"^(O|[BIES]-\S+)$")
_DIGIT = re.compile(r"\d")


def is_tag(text: str) -> bool:
    """``O`` or a ``B-``/``I-``/``E-``/``S-`` prefix and a type."""
    return bool(_TAG.match(text))


def detect_format(path: str | Path, tag_column: int = -1) -> str:
    """``"atis"`` for a folder with ``seq.in``, ``seq.out`` and ``label``; ``"conll"`` for a
    text file whose first token line has a tag (``O``, ``B-X``, ``I-X``, …) in ``tag_column``
    (or starts with ``-DOCSTART-``). Anything else raises one line naming the path and why."""
    path = Path(path)
    if path.is_dir():
        missing = [name for name in ATIS_FILES if not (path / name).is_file()]
        if not missing:
            return "atis"
        raise ValueError(f"{path} is neither tagging format: a folder must hold the ATIS files "
                         f"seq.in, seq.out and label (missing {', '.join(missing)}); CoNLL "
                         "data is one file per split")
    if not path.is_file():
        raise missing_data_file(path)
    with path.open("rb") as handle:
        head = [handle.readline() for _ in range(SNIFF_LINES)]
    try:
        lines = [raw.decode("utf-8").strip() for raw in head]
        lines[0] = lines[0].removeprefix("\ufeff")  # a byte-order mark, as read_conll drops it
    except UnicodeDecodeError:
        raise ValueError(f"{path} is neither tagging format: not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        columns = line.split()
        if columns[0] == "-DOCSTART-":
            return "conll"
        try:
            tag = columns[tag_column]
        except IndexError:
            tag = ""
        if len(columns) >= 2 and is_tag(tag):
            return "conll"
        raise ValueError(f"{path} is neither tagging format: line {number} ({line[:60]!r}) is "
                         f"not 'token ... tag' with a tag (O, B-X, I-X, E-X, S-X) in column "
                         f"{tag_column}, and an ATIS split is a folder (seq.in, seq.out, label)")
    raise ValueError(f"{path} is neither tagging format: no token line in its first "
                     f"{SNIFF_LINES} lines")


def evident_scheme(sentences: Sequence[Sequence[str]]) -> str | None:
    """The scheme the tags show they are written in: ``iobes`` if any ``E-``/``S-`` tag occurs,
    ``iob1`` if any ``I-`` tag begins an entity (after ``O`` or another type), ``iob2`` if any
    ``B-`` tag does (IOB1 writes ``B-`` only after an entity of its own type); None when no tag
    tells (no entities, or only ones the schemes write alike)."""
    iob1 = iob2 = False
    for tags in sentences:
        previous = "O"
        for tag in tags:
            if tag[:2] in ("E-", "S-"):
                return "iobes"
            begins = previous == "O" or previous[2:] != tag[2:]
            iob1 = iob1 or (tag.startswith("I-") and begins)
            iob2 = iob2 or (tag.startswith("B-") and begins)
            previous = tag
    return "iob1" if iob1 else "iob2" if iob2 else None


def detect_scheme(sentences: Sequence[Sequence[str]]) -> str:
    """:func:`evident_scheme`, with ``iob2`` where no tag tells."""
    return evident_scheme(sentences) or "iob2"


def write_tags(length: int, entities: Sequence[Entity], scheme: str) -> list[str]:
    """The tags of a sentence of ``length`` tokens holding ``entities`` (type, first, last;
    in order, not overlapping), written in ``scheme``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; one of {', '.join(SCHEMES)}")
    tags = ["O"] * length
    previous_end, previous_type = -2, ""
    for kind, first, last in entities:
        if scheme == "iob1":
            # B- only where the entity directly follows one of its own type: I- would merge them
            adjacent = first == previous_end + 1 and kind == previous_type
            tags[first] = f"B-{kind}" if adjacent else f"I-{kind}"
            tags[first + 1:last + 1] = [f"I-{kind}"] * (last - first)
        elif scheme == "iob2":
            tags[first] = f"B-{kind}"
            tags[first + 1:last + 1] = [f"I-{kind}"] * (last - first)
        elif first == last:
            tags[first] = f"S-{kind}"
        else:
            tags[first:last + 1] = [f"B-{kind}", *[f"I-{kind}"] * (last - first - 1), f"E-{kind}"]
        previous_end, previous_type = last, kind
    return tags


def convert(tags: Sequence[str], scheme: str) -> list[str]:
    """One sentence's tags in ``scheme``: its chunks as conlleval reads them, written again."""
    return write_tags(len(tags), get_entities(tags), scheme)


def word_key(token: str, lowercase: bool = False, zero_digits: bool = False) -> str:
    """The form of ``token`` in the word vocabulary: lower-cased, and with every digit 0 (so
    "1996-08-22" and "1997-01-05" share one vector; Lample et al. 2016, §4), as asked."""
    if lowercase:
        token = token.lower()
    if zero_digits:
        token = _DIGIT.sub("0", token)
    return token
