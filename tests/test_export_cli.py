"""``rnnkit export RUN model.onnx``: a trained run through its task's loader into ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rnnkit.cli import main

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnxscript", reason="onnxscript is not installed")


def test_export_a_trained_charlm_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "input.txt"
    data.write_text("the cat sat on the mat. " * 40, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "charlm", "--data", str(data), "--out", str(run), "--steps", "4",
                 "--eval-every", "4", "--layers", "2", "--hidden", "8", "--embedding", "4",
                 "--cell", "lstm", "--peephole", "--batch-size", "4", "--seq-len", "8",
                 "--sample-length", "5", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "lm.onnx")]) == 0
    out = capsys.readouterr().out
    assert "charlm model, inputs tokens; 2 recurrent node(s) LSTM LSTM" in out
    assert "onnxruntime agrees with rnnkit within" in out

    from rnnkit.tasks.charlm import load_model

    model, vocab, _ = load_model(run)
    tokens = torch.tensor([vocab.encode("the mat sat", "test")]).t()  # (T, 1): batch 1 works too
    session = ort.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"tokens": tokens.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(tokens)[0].numpy(), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnnkit export: error:")
    assert not (tmp_path / "m.onnx").exists()


def test_a_file_that_disagrees_with_rnnkit_is_an_error_and_removed(tmp_path: Path) -> None:
    """The check runs onnxruntime at other batch and time sizes than the export's and refuses a
    file whose outputs differ (here: weights changed after writing it), removing the file."""
    from rnnkit.export.cli import CHECK_BATCH, CHECK_STEPS, _check_with_onnxruntime, example_inputs
    from rnnkit.export.onnx import ExportError, export_onnx
    from rnnkit.models.language_model import LanguageModel, LMConfig

    torch.manual_seed(0)
    model = LanguageModel(LMConfig(vocab_size=7, cell="gru", layers=2, hidden=5, embedding=3)).eval()
    path = export_onnx(model, example_inputs(model), tmp_path / "lm.onnx")
    check = example_inputs(model, CHECK_STEPS, CHECK_BATCH)
    assert check[0].shape == (CHECK_STEPS, CHECK_BATCH)
    assert "agrees with rnnkit" in _check_with_onnxruntime(path, model, check)
    with torch.no_grad():
        model.rnn.weight_hh_l1.add_(0.5)
    with pytest.raises(ExportError, match=r"onnxruntime disagrees with rnnkit.*removed"):
        _check_with_onnxruntime(path, model, check)
    assert not path.exists()


def test_the_check_compares_a_tagger_output_dataclass_field_by_field(tmp_path: Path) -> None:
    """The tagger returns TaggerOutput (emissions, a bool mask, intent logits): the check compares
    each field with onnxruntime's outputs (it found no tensors in the dataclass before)."""
    from rnnkit.export.cli import CHECK_BATCH, CHECK_STEPS, _check_with_onnxruntime, example_inputs
    from rnnkit.export.onnx import export_onnx
    from rnnkit.models.recurrent import RecurrentConfig
    from rnnkit.models.tagger import Tagger, TaggerConfig

    torch.manual_seed(0)
    model = Tagger(TaggerConfig(vocab_size=9, tags=4, embedding=3, crf=True, intents=2,
                                recurrent=RecurrentConfig(cell="lstm", hidden=5, coupled=True,
                                                          bidirectional=True))).eval()
    path = export_onnx(model, example_inputs(model), tmp_path / "tagger.onnx")
    said = _check_with_onnxruntime(path, model, example_inputs(model, CHECK_STEPS, CHECK_BATCH))
    assert "agrees with rnnkit" in said and "on 3 outputs" in said


@pytest.mark.parametrize("attention, cell", [("additive", "lstm"), ("general", "gru"), ("none", "lstm")])
def test_a_translate_model_exports_its_encoder_and_one_decoder_step(tmp_path: Path, attention,
                                                                    cell) -> None:
    """A translate run is written as encoder + one decoder step (TranslateStep) and checked by
    onnxruntime at other batch and source sizes than the export's, with source lengths."""
    from rnnkit.export.cli import (
        CHECK_BATCH,
        CHECK_STEPS,
        TranslateStep,
        _check_with_onnxruntime,
        example_inputs,
        exportable,
    )
    from rnnkit.export.onnx import export_onnx
    from rnnkit.models.recurrent import RecurrentConfig
    from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig

    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(
        source_vocab=11, target_vocab=9, embedding=4, attention=attention,
        encoder=RecurrentConfig(cell=cell, hidden=5, bidirectional=True),
        decoder=RecurrentConfig(cell=cell, hidden=6, layers=2))).eval()
    step = exportable(model)
    assert isinstance(step, TranslateStep)
    path = export_onnx(step, example_inputs(step), tmp_path / "translate.onnx")
    check = example_inputs(model, CHECK_STEPS, CHECK_BATCH)
    assert check[0].shape == (CHECK_STEPS, CHECK_BATCH) and check[1].tolist() != [CHECK_STEPS] * 3
    said = _check_with_onnxruntime(path, step, check)
    outputs = 1 + (2 if cell == "lstm" else 1) + (attention != "none")
    assert "agrees with rnnkit" in said and f"on {outputs} outputs" in said
    # the first step's logits are what greedy decoding starts from
    with torch.no_grad():
        source, lengths, bos = check
        logits, _, _ = model.step(bos, model.encode(source, lengths))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), check)})[0]
    np.testing.assert_allclose(got, logits.numpy(), rtol=1e-5, atol=1e-5)


def test_a_tree_lstm_model_has_no_onnx_form(tmp_path: Path) -> None:
    from rnnkit.export.cli import example_inputs
    from rnnkit.export.onnx import ExportError
    from rnnkit.models.tree_lstm import TreeClassifier

    with pytest.raises(ExportError, match=r"tree-structured encoder TreeLSTM .* has no ONNX form"):
        example_inputs(TreeClassifier(7, 4, 5, 3))


def test_the_readme_onnxruntime_snippet_runs_an_exported_language_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "Run it:" snippet, as written, on a character LM exported as `rnnkit export`
    writes it (LSTM, 2 layers): its outputs are the logits and final states rnnkit computes."""
    import re

    from rnnkit.export.cli import example_inputs
    from rnnkit.export.onnx import export_onnx
    from rnnkit.models.language_model import LanguageModel, LMConfig

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Shipping a model"):]
    snippet = re.search(r"Run it:\n\n```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(vocab_size=30, cell="lstm", layers=2, hidden=6,
                                   embedding=4)).eval()
    export_onnx(model, example_inputs(model), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    names: dict[str, object] = {}
    exec(snippet, names)
    tokens = torch.from_numpy(names["tokens"])
    with torch.no_grad():
        logits, (h_n, c_n) = model(tokens)
    for got, want in zip((names["logits"], names["h_n"], names["c_n"]), (logits, h_n, c_n)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
