"""Text readers (plain, CoNLL, ATIS, TSV pairs, parallel, SST-2), vocabulary and bucketed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnkit.data.conll import detect_format
from rnnkit.data.text import (
    FormatError,
    Vocabulary,
    bucket_batches,
    pad_characters,
    pad_sequences,
    read_atis,
    read_conll,
    read_labelled_tsv,
    read_lines,
    read_parallel,
    read_tsv_pairs,
    unescape_ptb,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- vocabulary --------------------------------------------------------------------------


def test_vocabulary_min_freq_specials_and_json(tmp_path: Path) -> None:
    vocab = Vocabulary.build([["b", "a", "b"], ["c", "a", "b"]], min_freq=2)
    assert vocab.tokens == ["<pad>", "<unk>", "<s>", "</s>", "b", "a"]  # by count, then name
    assert (vocab.pad, vocab.unk, vocab.bos, vocab.eos) == (0, 1, 2, 3)
    assert vocab.encode(["a", "c"], bos=True, eos=True) == [2, 5, 1, 3]
    assert vocab.decode([2, 5, 4, 3, 4]) == ["a", "b"]  # stops at </s>
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").tokens == vocab.tokens
    tags = Vocabulary.build([["O", "B-x"]], specials=())
    with pytest.raises(KeyError, match="I-x"):
        tags.encode(["I-x"])  # no <unk>: an unknown tag is an error, not silently "unknown"
    assert len(Vocabulary.build([list("abcdef")], max_size=6)) == 6


# --- readers -----------------------------------------------------------------------------


def test_plain_lines_count_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", " the cat\n\nsat  down \n   \n")
    sentences, summary = read_lines(path)
    assert sentences == [["the", "cat"], ["sat", "down"]]
    assert summary.examples == 2 and summary.skipped == {"blank lines": 2}
    assert "skipped 2 blank lines" in str(summary)


def test_conll_columns_and_errors(tmp_path: Path) -> None:
    text = "-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\nPeter NNP B-PER\n"
    sentences, summary = read_conll(write(tmp_path / "ner.txt", text))
    assert sentences == [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]
    assert summary.skipped == {"-DOCSTART- lines": 1, "extra blank lines": 2}
    pos, _ = read_conll(write(tmp_path / "ner.txt", text), tag_column=1)
    assert pos[0][1] == ["NNP", "VBZ"]
    with pytest.raises(FormatError, match=r"bad\.txt, line 2: expected at least 3 columns"):
        read_conll(write(tmp_path / "bad.txt", "a X O\nb O\n"), tag_column=2)
    with pytest.raises(FormatError, match=r"line 1: a token line needs a token and a tag"):
        read_conll(write(tmp_path / "bad.txt", "lonely\n"))


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path: Path) -> None:
    # editors on Windows begin UTF-8 files with U+FEFF: it was read into the first token (an
    # extra one-token sentence "\ufeff-DOCSTART-" in CoNLL; no label column in a TSV header)
    bom = "\ufeff"
    conll = "-DOCSTART- -X- O O\r\n\r\nEU NNP B-ORG\r\nrejects VBZ O\r\n"
    assert read_conll(write(tmp_path / "ner.txt", bom + conll))[0] == [
        (["EU", "rejects"], ["B-ORG", "O"])]
    tsv = read_labelled_tsv(write(tmp_path / "train.tsv", bom + "label\tsentence\n1\ta gem\n"))
    assert tsv[0] == [(["a", "gem"], "1")]
    assert read_lines(write(tmp_path / "ptb.txt", bom + " the cat\n"))[0] == [["the", "cat"]]
    assert detect_format(write(tmp_path / "ner.txt", bom + conll)) == "conll"


def test_atis_triples_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "atis"
    write(folder / "seq.in", "i want to fly\nshow flights\n")
    write(folder / "seq.out", "O O O O\nO O\n")
    write(folder / "label", "atis_flight\natis_flight\n")
    examples, summary = read_atis(folder)
    assert examples[1] == (["show", "flights"], ["O", "O"], "atis_flight")
    assert summary.examples == 2
    write(folder / "seq.out", "O O O O\nO\n")
    with pytest.raises(FormatError, match=r"seq\.out, line 2: 1 tags for the 2 tokens"):
        read_atis(folder)
    write(folder / "seq.out", "O O O O\n")
    with pytest.raises(FormatError, match=r"one line per utterance \(seq\.in: 2, seq\.out: 1, label: 2\)"):
        read_atis(folder)


def test_tsv_pairs_and_parallel_files(tmp_path: Path) -> None:
    pairs, summary = read_tsv_pairs(write(tmp_path / "p.tsv", "ein Hund\ta dog\n\nHallo\thello\n"))
    assert pairs == [(["ein", "Hund"], ["a", "dog"]), (["Hallo"], ["hello"])]
    assert summary.skipped == {"blank lines": 1}
    with pytest.raises(FormatError, match=r"p\.tsv, line 2: expected source<TAB>target, found no tab"):
        read_tsv_pairs(write(tmp_path / "p.tsv", "a\tb\nno tab here\n"))
    with pytest.raises(FormatError, match=r"line 1: empty target side"):
        read_tsv_pairs(write(tmp_path / "p.tsv", "a\t \n"))
    de = write(tmp_path / "train.de", "Zwei Männer\nEin Hund\n")
    en = write(tmp_path / "train.en", "Two men\nA dog\n")
    pairs, _ = read_parallel(de, en, lowercase=True)
    assert pairs[0] == (["zwei", "männer"], ["two", "men"])
    with pytest.raises(FormatError, match="line-aligned"):
        read_parallel(de, write(tmp_path / "short.en", "Two men\n"))


def test_labelled_tsv_with_header(tmp_path: Path) -> None:
    text = "label\tsentence\n0\thide new secretions\n\n1\ta gem\n"
    examples, summary = read_labelled_tsv(write(tmp_path / "train.tsv", text))
    assert examples == [(["hide", "new", "secretions"], "0"), (["a", "gem"], "1")]
    assert summary.skipped == {"header lines": 1, "blank lines": 1}
    glue = "sentence\tlabel\na gem\t1\n"  # GLUE's column order: found by name
    assert read_labelled_tsv(write(tmp_path / "glue.tsv", glue))[0] == [(["a", "gem"], "1")]
    with pytest.raises(FormatError, match=r"train\.tsv, line 3: expected 2 tab-separated columns"):
        read_labelled_tsv(write(tmp_path / "train.tsv", "label\tsentence\n0\tok\n1 missing tab\n"))
    # columns are matched by role, whatever the spelling and case
    for header in ("Polarity\tReview", "label\tcontent", "text\tsentiment"):
        found = read_labelled_tsv(write(tmp_path / "roles.tsv", f"{header}\n1\tgood\n"))[0]
        assert found == ([(["good"], "1")] if header[0] != "t" else [(["1"], "good")])
    with pytest.raises(FormatError, match=r"line 1: header .* lacks a column named label"):
        read_labelled_tsv(write(tmp_path / "train.tsv", "score\ttext\n0\tok\n"))
    with pytest.raises(FormatError, match=r"lacks a column named sentence or content or text"):
        read_labelled_tsv(write(tmp_path / "train.tsv", "label\tbody\n0\tok\n"))


def test_ptb_escapes_become_characters_again() -> None:
    tokens = ["-LRB-", "a", "\\/", "b", "-rrb-", "f\\*\\*k", "-lsb-", "-RCB-", "lrb"]
    assert unescape_ptb(tokens) == ["(", "a", "/", "b", ")", "f**k", "[", "}", "lrb"]


def test_missing_and_non_utf8_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_lines(tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(FormatError, match=r"latin1\.txt: not UTF-8"):
        read_lines(tmp_path / "latin1.txt")


# --- batching ----------------------------------------------------------------------------


def test_bucketed_batches_cover_everything_once_and_group_similar_lengths() -> None:
    lengths = [(i * 7919) % 50 + 1 for i in range(1000)]
    batches = bucket_batches(lengths, batch_size=32, bucket_size=320, seed=3)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(1000))
    assert bucket_batches(lengths, 32, 320, seed=3) == batches  # the seed fixes the order
    assert bucket_batches(lengths, 32, 320, seed=4) != batches
    for batch in batches:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    # padding waste is far below that of random batches
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.15 * sum(lengths)
    ordered = bucket_batches(lengths, 32, shuffle=False)
    assert [lengths[b[0]] for b in ordered] == sorted((lengths[b[0]] for b in ordered), reverse=True)


def test_padding_helpers() -> None:
    tokens, lengths = pad_sequences([[5, 6, 7], [8]], pad=0)
    assert tokens.tolist() == [[5, 8], [6, 0], [7, 0]] and lengths.tolist() == [3, 1]
    chars, char_lengths = pad_characters([[[1, 2], [3]], [[4, 5, 6]]])
    assert chars.shape == (2, 2, 3)
    assert chars[0, 1].tolist() == [4, 5, 6] and char_lengths.tolist() == [[2, 3], [1, 0]]
    assert torch.equal(chars[1, 1], torch.zeros(3, dtype=torch.int64))


# --- the real corpora, when the shared data folder is beside the repository ----------------

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data sets beside the repository)")
    return path


def test_reads_the_real_atis_and_sst2_files() -> None:
    atis, summary = read_atis(shared("atis/dev"))
    assert summary.examples == len(atis) == 500 and summary.skipped_lines == 0
    sst, summary = read_labelled_tsv(shared("sst2/dev.tsv"))
    assert len(sst) == 872 and {label for _, label in sst} == {"0", "1"}
    assert summary.skipped == {"header lines": 1}


def test_raw_text_is_tokenised_as_the_treebank_corpora_are() -> None:
    from rnnkit.data.text import tokenize_text

    assert tokenize_text("I loved it!") == ["I", "loved", "it", "!"]
    assert tokenize_text("Don't you think it's (really) good...") == [
        "Do", "n't", "you", "think", "it", "'s", "(", "really", ")", "good", "..."]
    assert tokenize_text('"Quoted," she said.') == ['"', "Quoted", ",", '"', "she", "said", "."]
    assert tokenize_text("well-known 3.50 3,50") == ["well-known", "3.50", "3,50"]
    # already-tokenised text stays as it is; words the vocabulary holds are kept whole
    sst = "it 's a charming and often affecting journey . "
    assert tokenize_text(sst) == sst.split()
    assert tokenize_text("flights to st. louis", known={"st.", "louis"}) == ["flights", "to", "st.", "louis"]
    assert tokenize_text("to st. louis") == ["to", "st", ".", "louis"]
    # a word known only in lower case (PTB, ATIS) is read in lower case; known casing is kept
    assert tokenize_text("The EU said", known={"the", "said", "EU"}) == ["the", "EU", "said"]
    assert tokenize_text("The EU", lowercase=True) == ["the", "eu"]
    assert tokenize_text("   ") == []
