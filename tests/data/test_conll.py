"""CoNLL data helpers: format detection, tag schemes (against hand-made IOB1 cases and seqeval's
strict scheme reader), word keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import shared_file
from rnnkit.data.conll import (
    convert,
    detect_format,
    detect_scheme,
    evident_scheme,
    word_key,
    write_tags,
)
from rnnkit.data.text import read_conll
from rnnkit.metrics.entities import get_entities

# (IOB1 as CoNLL-2003 writes it, the same chunks in IOB2, in IOBES)
CASES = [
    (["I-PER", "I-PER", "O", "I-LOC"], ["B-PER", "I-PER", "O", "B-LOC"],
     ["B-PER", "E-PER", "O", "S-LOC"]),
    # two LOC entities touching: IOB1's only B-
    (["I-LOC", "B-LOC", "I-LOC"], ["B-LOC", "B-LOC", "I-LOC"], ["S-LOC", "B-LOC", "E-LOC"]),
    # touching entities of different types need no B-
    (["I-PER", "I-ORG", "I-ORG", "O"], ["B-PER", "B-ORG", "I-ORG", "O"],
     ["S-PER", "B-ORG", "E-ORG", "O"]),
    (["O", "I-MISC", "I-MISC", "I-MISC"], ["O", "B-MISC", "I-MISC", "I-MISC"],
     ["O", "B-MISC", "I-MISC", "E-MISC"]),
    (["O", "O"], ["O", "O"], ["O", "O"]),
]


@pytest.mark.parametrize(("iob1", "iob2", "iobes"), CASES)
def test_schemes_convert_by_hand(iob1: list[str], iob2: list[str], iobes: list[str]) -> None:
    for source in (iob1, iob2, iobes):
        assert convert(source, "iob1") == iob1
        assert convert(source, "iob2") == iob2
        assert convert(source, "iobes") == iobes


def test_schemes_are_detected() -> None:
    assert detect_scheme([["I-PER", "O"], ["B-LOC"]]) == "iob1"  # an I- opens an entity
    assert detect_scheme([["O", "B-LOC", "I-LOC"], ["B-PER"]]) == "iob2"
    assert detect_scheme([["O", "S-LOC"]]) == "iobes"
    # I- after another type opens an entity: IOB1
    assert detect_scheme([["B-PER", "I-LOC"]]) == "iob1"
    # no tag tells (no entity, or B- only after its own type, as both IOB schemes write it)
    assert evident_scheme([["O", "O"], []]) is None and detect_scheme([["O"]]) == "iob2"
    assert evident_scheme([["I-PER", "B-PER"]]) == "iob1"
    assert evident_scheme([["O", "B-PER", "I-PER", "B-PER"]]) == "iob2"


def test_write_tags_refuses_an_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown tag scheme 'bilou'"):
        write_tags(2, [("PER", 0, 1)], "bilou")


def test_conll2003_round_trips_and_seqeval_reads_our_iobes() -> None:
    scheme = pytest.importorskip("seqeval.scheme", reason="the dev extra installs seqeval")
    sentences, _ = read_conll(shared_file("conll2003/eng.train"))
    gold = [tags for _, tags in sentences]
    assert detect_scheme(gold) == "iob1"
    for tags in gold:
        iobes = convert(tags, "iobes")
        assert convert(iobes, "iob1") == tags  # the file is canonical IOB1
        assert get_entities(iobes) == get_entities(tags)
    # seqeval's strict IOBES reader (not ours) finds the same entities in what we wrote
    sample = [convert(tags, "iobes") for tags in gold[:2000]]
    theirs = scheme.Entities(sample, scheme.IOBES)
    ours = {(i, kind, first, last + 1) for i, tags in enumerate(sample)
            for kind, first, last in get_entities(tags)}
    assert {e.to_tuple() for sentence in theirs.entities for e in sentence} == ours
    assert len(ours) > 3000


def test_word_key() -> None:
    assert word_key("Paris-1996", lowercase=True, zero_digits=True) == "paris-0000"
    assert word_key("Paris-1996") == "Paris-1996"
    assert word_key("3.50", zero_digits=True) == "0.00"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_detect_format(tmp_path: Path) -> None:
    atis = tmp_path / "atis"
    atis.mkdir()
    for name in ("seq.in", "seq.out", "label"):
        _write(atis / name, "x\n")
    assert detect_format(atis) == "atis"
    conll = _write(tmp_path / "a.txt", "\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n")
    assert detect_format(conll) == "conll"
    assert detect_format(_write(tmp_path / "b.txt", "-DOCSTART- -X- O O\n")) == "conll"
    assert detect_format(_write(tmp_path / "c.tsv", "EU\tS-ORG\n")) == "conll"
    # the tag in another column than the last
    assert detect_format(_write(tmp_path / "d.txt", "EU B-ORG NNP\n"), tag_column=1) == "conll"


@pytest.mark.parametrize(("text", "problem"), [
    ("The cat sat on the mat .\n", r"line 1 \('The cat sat on the mat \.'\) is not 'token \.\.\. "
                                   r"tag'"),
    ("EU NNP\n", "line 1"),
    ("\n\n", "no token line"),
])
def test_detect_format_names_what_is_wrong(tmp_path: Path, text: str, problem: str) -> None:
    path = _write(tmp_path / "x.txt", text)
    with pytest.raises(ValueError, match=f"x.txt is neither tagging format: .*{problem}") as error:
        detect_format(path)
    assert "\n" not in str(error.value)


def test_detect_format_other_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"a folder must hold the ATIS files .*missing seq\.in, "
                                         r"seq\.out, label"):
        detect_format(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(tmp_path / "missing.txt")
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01\n")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        detect_format(binary)
