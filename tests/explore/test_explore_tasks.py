"""The explorer on every other task's run: word LM, sentiment, digits, speech; other cells."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
from explore_helpers import train_charlm, train_speech, train_task

from rnnkit.explore.analysis import InputError, load_run
from rnnkit.models.generator import frame_nll
from rnnkit.tasks import digits, music, sentiment, translate, wordlm

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.mark.parametrize("model", [{"cell": "gru", "layers": 2},
                                   {"peephole": True, "coupled": True, "layers": 2},
                                   {"cell": "rnn", "nonlinearity": "relu"},
                                   {"cell": "mingru", "layers": 2}, {"cell": "minlstm"}])
def test_every_cell_is_recorded_as_the_layer_computes_it(tmp_path: Path, model: dict) -> None:
    explorer = load_run(train_charlm(tmp_path / "run", **model))
    analysis = explorer.analyse("he said hi\n")
    kinds = {t["kind"] for t in analysis.trace_info()}
    names = [q["name"] for q in analysis.trace_info()[0]["quantities"]]
    expected = {"gru": ["h", "z", "r", "n"], "rnn": ["h"], "mingru": ["h", "a", "b"],
                "minlstm": ["h", "a", "b"]}.get(model.get("cell", ""), ["h", "c", "i", "f", "g", "o"])
    assert names == expected and len(kinds) == 1
    tokens = torch.tensor(explorer.vocab.encode("he said hi\n")).unsqueeze(1)
    with torch.no_grad():
        output, _ = explorer.model.rnn(explorer.model.embedding(tokens))
    top = len(analysis.traces) - 1
    torch.testing.assert_close(analysis.values(top, "h"), output[:, 0])
    if model.get("cell", "").startswith("min"):  # h_t = a_t ⊙ h_{t−1} + b_t, step by step
        a, b, h = (analysis.values(top, name) for name in "abh")
        torch.testing.assert_close(h[1:], a[1:] * h[:-1] + b[1:])
        assert ((a > 0) & (a < 1)).all()
    if model.get("coupled"):
        torch.testing.assert_close(analysis.values(0, "f"), 1 - analysis.values(0, "i"))


def test_word_lm(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text(" the cat sat on the mat\n a dog ran to the <unk>\n" * 20)
    (tmp_path / "valid.txt").write_text(" the cat ran to a zebra\n" * 3)
    config = wordlm.default_config()
    config["data"].update(train=str(tmp_path / "train.txt"), valid=str(tmp_path / "valid.txt"),
                          seq_len=5, eval_batch_size=2)
    config["model"].update(hidden=8, embedding=8, layers=1)
    config["train"].update(steps=2, batch_size=4, eval_every=2)
    explorer = load_run(train_task(wordlm, config, tmp_path / "run"))
    assert explorer.default_input().startswith("the cat ran to a zebra <eos> the")
    analysis = explorer.analyse("the zebra sat")
    assert analysis.symbols == ["the", "<unk>", "sat"]  # what the model reads
    ids = torch.tensor(explorer.vocab.encode(["the", "zebra", "sat"])).unsqueeze(1)
    with torch.no_grad():
        logits, _ = explorer.model(ids)
    probs = torch.softmax(logits[:, 0].double(), dim=-1)
    assert analysis.predictions["actual_next"][0] == pytest.approx(float(probs[0, ids[1, 0]]))


def test_sentiment_probabilities_over_time_are_the_prefixes(tmp_path: Path) -> None:
    rows = [f"{i % 2}\tthe film was {'great fine' if i % 2 else 'dull bad'}" for i in range(40)]
    (tmp_path / "train.tsv").write_text("label\tsentence\n" + "\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("label\tsentence\n" + "\n".join(rows[:6]) + "\n")
    config = sentiment.default_config()
    config["data"].update(train=str(tmp_path / "train.tsv"), valid=str(tmp_path / "dev.tsv"),
                          holdout=0)
    config["model"].update(embedding=8, chars=True)
    config["model"]["recurrent"].update(hidden=6)
    config["train"].update(steps=2, batch_size=8, eval_every=2)
    explorer = load_run(train_task(sentiment, config, tmp_path / "run"))
    analysis = explorer.analyse("the film was great")
    p = analysis.predictions
    assert p["kind"] == "classes" and p["steps"] == [0, 1, 2, 3]
    for step, probs in zip(p["steps"], p["probabilities"]):
        prefix = " ".join(["the", "film", "was", "great"][:step + 1])
        label, prob = sentiment.classify(explorer.model, explorer.encoder, explorer.labels, prefix)
        assert max(probs) == pytest.approx(prob, rel=1e-5)
        assert p["labels"][probs.index(max(probs))] == label
    assert p["final"] == pytest.approx(p["probabilities"][-1], rel=1e-5)
    assert [t["name"] for t in analysis.trace_info()] == ["rnn layer 0 forward",
                                                          "rnn layer 0 reverse"]


def test_digits_reads_a_test_image_row_by_row(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the digits task reads scikit-learn's bundled images")
    config = digits.default_config()
    config["model"]["recurrent"].update(hidden=6)
    config["train"].update(steps=2, batch_size=32, eval_every=2)
    explorer = load_run(train_task(digits, config, tmp_path / "run"))
    analysis = explorer.analyse(explorer.default_input())
    assert len(analysis.symbols) == 8 and analysis.symbols[0].startswith("row 0: ")
    images, _, test = explorer.images()
    with torch.no_grad():
        probs = torch.softmax(explorer.model(digits.to_sequence(images[test[:1]], "rows")).double(), -1)
    assert analysis.predictions["final"] == pytest.approx(probs[0].tolist(), rel=1e-5)
    for bad, message in (("seven", "number of a test image"), ("100000", "test images")):
        with pytest.raises(InputError, match=message):
            explorer.analyse(bad)


def test_speech_shows_ctc_posteriors_of_a_wav(tmp_path: Path) -> None:
    folder = tmp_path / "recordings"
    explorer = load_run(train_speech(tmp_path / "run", folder))
    wav = explorer.default_input()  # a recording of the run's folder, base64
    analysis = explorer.analyse(wav)
    posteriors = torch.tensor(analysis.predictions["posteriors"], dtype=torch.float64)
    torch.testing.assert_close(posteriors.sum(1), torch.ones(len(posteriors), dtype=torch.float64))
    features = explorer.extractor.from_file(sorted(folder.glob("*.wav"))[0])
    with torch.no_grad():
        log_probs, _ = explorer.model(features.unsqueeze(1), torch.tensor([features.shape[0]]))
    torch.testing.assert_close(posteriors, log_probs[:, 0].double().exp(), rtol=1e-5, atol=1e-6)
    assert analysis.trace_info()[0]["module"] == "encoder"
    with pytest.raises(InputError, match="uploaded file"):
        explorer.analyse(base64.b64encode(b"RIFF, but not really a wav").decode())
    with pytest.raises(InputError, match="base64"):
        explorer.analyse("not base64!")


def test_translate_records_encoder_and_decoder_with_attention(tmp_path: Path) -> None:
    config = translate.default_config()
    config["data"].update(train_size=48, valid_size=4)
    config["model"].update(embedding=8)
    config["model"]["encoder"].update(hidden=6)
    config["model"]["decoder"].update(hidden=6)
    config["train"].update(steps=2, batch_size=16, eval_every=2)
    explorer = load_run(train_task(translate, config, tmp_path / "run"))
    text = explorer.default_input()
    analysis = explorer.analyse(text)
    p = analysis.predictions
    info = {t["name"]: t for t in analysis.trace_info()}
    assert set(info) == {"encoder layer 0 forward", "encoder layer 0 reverse",
                         "decoder layer 0 forward"}
    assert info["encoder layer 0 forward"]["symbols"] == p["source"] == list(text)
    assert info["decoder layer 0 forward"]["symbols"] == p["output"]
    assert p["output"][-1] == "</s>"
    translator = explorer.translator
    assert p["translation"] == translator.translate(text)
    source = translator.source_ids(text)
    tokens = translator.target_vocab.encode(p["output"][:-1])
    expected = explorer.model.attention_map(source, tokens)
    torch.testing.assert_close(torch.tensor(p["attention"]), expected)
    # the decoder, called one step at a time, is recorded as one sequence: its h are the
    # decoder's own outputs at each step
    decoder = next(i for i, t in enumerate(analysis.trace_info()) if t["module"] == "decoder")
    hidden = []
    with torch.no_grad():
        state = explorer.model.encode(source.unsqueeze(1), torch.tensor([source.numel()]))
        for token in [explorer.model.config.bos, *tokens]:
            _, _, state = explorer.model.step(torch.tensor([token]), state)
            hidden.append(state.hidden[0][-1, 0])
    torch.testing.assert_close(analysis.values(decoder, "h"), torch.stack(hidden))


def test_music_reads_a_validation_sequence(tmp_path: Path) -> None:
    pytest.importorskip("scipy", reason="JSB chorales come as a .mat file")
    from scipy.io import savemat

    cells = np.empty((1, 3), dtype=object)
    for i in range(3):
        roll = np.zeros((7 + i, 88), dtype=np.uint8)
        for t in range(7 + i):
            roll[t, 39 + (0, 4, 7)[t % 3]] = 1
        cells[0, i] = roll
    savemat(str(tmp_path / "tiny.mat"), {"traindata": cells, "validdata": cells,
                                         "testdata": cells})
    config = music.default_config()
    config["data"]["path"] = str(tmp_path / "tiny.mat")
    config["model"]["recurrent"].update(hidden=6)
    config["train"].update(steps=2, batch_size=2, eval_every=2)
    explorer = load_run(train_task(music, config, tmp_path / "run"))
    analysis = explorer.analyse("1")
    assert analysis.symbols[:3] == ["C4", "E4", "G4"]  # column 39 is MIDI 60, middle C
    roll = torch.tensor(cells[0, 1], dtype=torch.float32)
    with torch.no_grad():
        logits, _ = explorer.model(roll.unsqueeze(1))
    nll = analysis.predictions["nll"]
    assert len(nll) == 8 and nll[-1] is None
    assert sum(nll[:-1]) / 7 == pytest.approx(float(frame_nll(logits[:-1], roll[1:].unsqueeze(1))),
                                              rel=1e-5)
    with pytest.raises(InputError, match="3 validation sequences"):
        explorer.analyse("3")


def test_speech_html_takes_a_wav_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rnnkit.cli import main

    folder = tmp_path / "recordings"
    run = train_speech(tmp_path / "run", folder)
    wav = sorted(folder.glob("*.wav"))[3]
    assert main(["explore", str(run), "--html", str(tmp_path / "a.html"), "--input", str(wav)]) == 0
    assert "works offline" in capsys.readouterr().out
    assert main(["explore", str(run), "--html", str(tmp_path / "b.html"), "--text", "12"]) == 2
    assert "give a WAV file with --input" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    charlm_run = train_charlm(tmp_path / "charlm")
    assert main(["explore", str(charlm_run), "--html", str(tmp_path / "c.html"), "--input",
                 str(tmp_path / "latin1.txt")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
