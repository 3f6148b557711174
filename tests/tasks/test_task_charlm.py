"""Character LM: Unicode and byte vocabularies, batch layout, sampling, evaluation, corpora."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rnnkit.data import CharVocab, UnknownSymbolError, batchify
from rnnkit.data.corpus import read_stdlib, stdlib_files
from rnnkit.models import LanguageModel, LMConfig, generate
from rnnkit.tasks import merge_config
from rnnkit.tasks.charlm import (
    CharLMTask,
    DataConfig,
    default_config,
    evaluate_text,
    split_text,
)
from rnnkit.train import TrainConfig, Trainer

SCRIPTS = "한국어 텍스트 မြန်မာစာ বাংলা লিপি 中文文本 "  # Korean, Burmese, Bengali, Chinese


def test_code_point_vocabulary_round_trips_many_scripts() -> None:
    vocab = CharVocab.from_text(SCRIPTS)
    assert len(vocab) == len(set(SCRIPTS))
    assert vocab.decode(vocab.encode(SCRIPTS)) == SCRIPTS
    assert "한" in vocab.symbols and "中" in vocab.symbols and "ব" in vocab.symbols


def test_byte_vocabulary_round_trips_and_stays_small() -> None:
    vocab = CharVocab.from_text(SCRIPTS, byte_level=True)
    assert all(isinstance(s, int) for s in vocab.symbols) and len(vocab) <= 256
    assert len(vocab.encode(SCRIPTS)) == len(SCRIPTS.encode("utf-8"))
    assert vocab.decode(vocab.encode(SCRIPTS)) == SCRIPTS
    assert CharVocab.from_json(vocab.to_json()) == vocab


def test_unknown_symbol_is_named() -> None:
    vocab = CharVocab.from_text("abc 한국")
    with pytest.raises(UnknownSymbolError, match=r"prime contains '어' \(U\+C5B4\)"):
        vocab.encode("한국어", what="prime")


def test_batchify_rows_continue_their_own_stream() -> None:
    tokens = torch.arange(23)
    stream = batchify(tokens, 4)  # (5, 4); 3 tokens dropped
    assert stream.shape == (5, 4)
    for row in range(4):
        assert stream[:, row].tolist() == list(range(row * 5, row * 5 + 5))


def _tiny_model(vocab: CharVocab, cell: str = "lstm", **options: object) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(LMConfig(vocab_size=len(vocab), cell=cell, layers=1, hidden=16,
                                  embedding=8, **options))  # type: ignore[arg-type]


def test_sampling_is_deterministic_with_a_seed() -> None:
    vocab = CharVocab.from_text(SCRIPTS)
    model = _tiny_model(vocab)
    a = generate(model, vocab, "한국", length=30, temperature=1.0, seed=5)
    b = generate(model, vocab, "한국", length=30, temperature=1.0, seed=5)
    c = generate(model, vocab, "한국", length=30, temperature=1.0, seed=6)
    assert a == b and a != c
    assert a.startswith("한국") and len(a) == 32


def test_top_k_one_and_temperature_zero_are_greedy() -> None:
    vocab = CharVocab.from_text(SCRIPTS)
    model = _tiny_model(vocab)
    greedy = generate(model, vocab, "中", length=20, temperature=0)
    assert generate(model, vocab, "中", length=20, temperature=1.5, top_k=1, seed=1) == greedy


def test_unknown_prime_symbol_is_a_clear_error() -> None:
    vocab = CharVocab.from_text(SCRIPTS)
    with pytest.raises(UnknownSymbolError, match="'Q'"):
        generate(_tiny_model(vocab), vocab, "Q", length=5)


@pytest.mark.parametrize(("cell", "options"), [
    ("lstm", {"peephole": True}), ("lstm", {"coupled": True}), ("gru", {"reset": "before"}),
    ("rnn", {}),
])
def test_every_cell_variant_learns(cell: str, options: dict[str, object]) -> None:
    text = "abcd한국어" * 40
    vocab = CharVocab.from_text(text, byte_level=cell == "rnn")  # bytes for one of them
    model = _tiny_model(vocab, cell, **options)
    task = CharLMTask(vocab, text, text[:200], DataConfig(seq_len=8), model.config, 4)
    before = evaluate_text(model, vocab, text[:200], seq_len=8)
    Trainer(model, task, TrainConfig(steps=25, batch_size=4, lr=0.03, eval_every=25),
            progress=False).fit()
    after = evaluate_text(model, vocab, text[:200], seq_len=8)
    assert after["loss"] < 0.6 * before["loss"]
    assert math.isclose(after["bpc"], after["loss"] / math.log(2))


def test_one_hot_inputs() -> None:
    vocab = CharVocab.from_text("hello")
    model = LanguageModel(LMConfig(vocab_size=len(vocab), layers=1, hidden=4, embedding=0))
    logits, _ = model(torch.tensor(vocab.encode("hell")).unsqueeze(1))
    assert model.embedding is None and logits.shape == (4, 1, len(vocab))


def test_config_merging_names_unknown_options() -> None:
    config = merge_config(default_config(), {"model": {"hidden": 7}}, "x.yaml", "charlm")
    assert config["model"]["hidden"] == 7
    with pytest.raises(ValueError, match=r"model.hiden is an unknown option; did you mean hidden\?.*x.yaml"):
        merge_config(default_config(), {"model": {"hiden": 7}}, "x.yaml", "charlm")
    with pytest.raises(ValueError, match="modle is an unknown option; did you mean model"):
        merge_config(default_config(), {"modle": {}}, "x.yaml", "charlm")


def test_stdlib_corpus_is_a_deterministic_sorted_selection() -> None:
    files = stdlib_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    text, used = read_stdlib(max_chars=60_000)
    again, _ = read_stdlib(max_chars=60_000)
    assert text == again and 0 < len(text) <= 60_000 + len(used[0].read_text())
    assert "def " in text and used == sorted(used)


def test_tiny_shakespeare_vocabulary() -> None:
    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"needs {path} (the shared data sets beside the repository)")
    text = path.read_text(encoding="utf-8")
    assert len(CharVocab.from_text(text)) == 65
    assert split_text(text, DataConfig(valid_fraction=0.1, valid_chars=None))[1] == text[
        int(len(text) * 0.9):]


def test_evaluation_can_leave_out_unknown_symbols() -> None:
    vocab = CharVocab.from_text("abc ")
    model = _tiny_model(vocab)
    with pytest.raises(UnknownSymbolError, match="'z'"):
        evaluate_text(model, vocab, "abc abz abc")
    metrics = evaluate_text(model, vocab, "abc abz abc", skip_unknown=True)
    assert metrics["unknown"] == 1 and metrics["symbols"] == 10
