"""Every task: train a tiny run, rnnkit.load it, predict and evaluate through the Python API and
the command line; evaluate on the validation data gives exactly the validation numbers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pipeline_runs import TASKS, Run, make_run

import rnnkit
from rnnkit.cli import main
from rnnkit.pipelines import Pipeline, Result
from rnnkit.train.checkpoint import load_checkpoint

# the fields each task's results carry
FIELDS = {
    "charlm": {"prime", "text"},
    "wordlm": {"prime", "words", "text"},
    "sentiment": {"text", "tokens", "label", "probability", "probabilities", "unknown"},
    "digits": {"input", "label", "probability", "probabilities"},
    "tagging": {"text", "tokens", "tags", "entities", "intent", "unknown"},
    "translate": {"source", "translation", "log_prob", "per_token", "unknown", "finished"},
    "music": {"primer", "steps", "notes", "midi"},
    "speech": {"path", "digits", "log_prob", "frames"},
}
EVALUATE = {"music": {"split": "valid"}}  # music's validation is the .mat's validdata


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # tiny GEMMs gain nothing from threads, and on a shared machine spinning workers cost 100×
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", params=TASKS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return make_run(request.param, tmp_path_factory.mktemp(request.param))


def test_load_gives_one_pipeline_type(run: Run) -> None:
    pipe = rnnkit.load(run.path)
    assert isinstance(pipe, Pipeline) and pipe.task == run.task
    assert pipe.config["task"] == run.task and "model" in pipe.config
    assert not pipe.module.training
    assert pipe.checkpoint.path == run.path / "best.json"  # a run directory means its best weights
    assert rnnkit.load(run.path / "checkpoint.json").checkpoint.path.name == "checkpoint.json"


def test_evaluate_gives_the_validation_numbers(run: Run) -> None:
    pipe = rnnkit.load(run.path)
    validated = load_checkpoint(run.path / "best.json").meta["valid"]
    metrics = pipe.evaluate(run.valid, **EVALUATE.get(run.task, {}))
    for key, value in validated.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert pipe.describe_metrics(metrics)


def test_predict_answers_in_named_results(run: Run, tmp_path: Path) -> None:
    pipe = rnnkit.load(run.path)
    options = {"out": str(tmp_path / "song.mid"), "steps": 8, "seed": 1} if run.task == "music" else {}
    results = pipe.predict(run.inputs, batch_size=2, **options)
    assert isinstance(results, list) and len(results) == len(run.inputs)
    for result in results:
        assert isinstance(result, Result) and str(result)
        plain = result.to_dict()
        assert set(plain) == FIELDS[run.task]
        json.dumps(plain)
    single = pipe.predict(run.inputs[0], **options)
    assert isinstance(single, Result) and type(pipe(run.inputs[0], **options)) is type(single)
    first = results[0]
    if run.task == "sentiment":
        assert first.label in ("negative", "positive")
        assert sum(first.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert first.tokens == ["the", "film", "was", "great", "!"]  # "!" split off, lower-cased
        assert results[1].tokens[:2] == ["it", "'s"] and "dull" not in results[1].unknown
        assert results[1].unknown == ["it", "'s", ",", "really", "."]  # never in training
    elif run.task == "tagging":
        assert first.tokens[-2:] == ["new", "york"] and len(first.tags) == len(first.tokens)
        assert first.intent in ("atis_flight", "atis_airfare") and first.unknown == []
        for entity in first.entities:
            assert entity.text == " ".join(first.tokens[entity.start:entity.end + 1])
    elif run.task == "digits":
        assert first.label in [str(d) for d in range(10)] and len(first.probabilities) == 10
        # the same digit as a scan (dark ink on white, 64×64 pixels) reads as the array does
        import numpy as np
        from PIL import Image

        counts = run.inputs[0].astype(np.float64)  # (8, 8) pixel counts 0-16
        scan = Image.fromarray((255 - counts * 255 / 16).round().astype(np.uint8))
        scan.resize((64, 64), Image.Resampling.NEAREST).save(tmp_path / "scan.png")
        read = pipe.predict(str(tmp_path / "scan.png"))
        assert read.label == first.label
        for digit, p in first.probabilities.items():
            assert read.probabilities[digit] == pytest.approx(p, abs=1e-3)
    elif run.task == "translate":
        assert first.log_prob <= 0 and first.per_token <= 0 and first.unknown == []
        beam = pipe.predict(run.inputs[0], beam=3)
        assert beam.log_prob >= first.log_prob - 1e-6  # beam search finds at least greedy's score
        odd = pipe.predict("ǂǂǂ")  # nothing like training: still answers, and says so
        assert odd.unknown == ["ǂ", "ǂ", "ǂ"]
    elif run.task == "charlm":
        assert first.text.startswith("the c") and len(first.text) == len("the c") + 200
        again = pipe.predict(["a dog", "the c"], length=20, seed=4, temperature=1.0)
        other = pipe.predict(["the cat", "the c"], length=20, seed=4, temperature=1.0, batch_size=1)
        assert again[1] == other[1]  # a stream's sample does not depend on its neighbours
        assert again[1] == pipe.predict("the c", length=20, seed=5, temperature=1.0)  # seed + i
    elif run.task == "wordlm":
        assert first.words[:2] == ["the", "cat"]  # lower-cased as PTB is
        assert results[2].words[:5] == ["a", "<unk>", "sat", "N", "days"]  # numbers read as PTB's N
    elif run.task == "music":
        assert first.midi is not None and Path(first.midi).is_file() and first.roll.shape == (8, 88)
        from rnnkit.tasks.midi import read_midi

        continued = pipe.predict(first.midi, steps=4, seed=2)
        assert continued.roll.shape[0] == read_midi(first.midi).shape[0] + 4
    elif run.task == "speech":
        assert set(first.digits) <= set("0123456789")


def test_command_line_predict_and_evaluate(run: Run, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--out", str(tmp_path / "song.mid"), "--steps", "6"] if run.task == "music" else []
    inputs = [str(i) for i in run.inputs if i is not None]
    if run.task == "digits":  # a line of 64 numbers is an image
        inputs = [" ".join(str(int(v)) for v in run.inputs[0].flatten())]
    assert main(["predict", str(run.path), *inputs, "--json", *extra]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == max(1, len(inputs))
    assert all(set(json.loads(line)) == FIELDS[run.task] for line in lines)
    # --input FILE and the readable form
    lines_in = [i for i in inputs if i]
    if lines_in:
        listing = tmp_path / "inputs.txt"
        listing.write_text("\n".join(lines_in) + "\n")
        assert main(["predict", str(run.path), "--input", str(listing), "--batch-size", "1",
                     *extra]) == 0
        assert len(capsys.readouterr().out.strip().split("\n")) >= len(lines_in)
    evaluate = ["evaluate", str(run.path), "--data", str(run.valid)]
    if run.task == "music":
        evaluate += ["--split", "valid"]
    assert main([*evaluate, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    validated = load_checkpoint(run.path / "best.json").meta["valid"]
    assert printed["loss"] == pytest.approx(validated["loss"], rel=1e-6)
    assert main(evaluate) == 0
    assert str(run.valid) in capsys.readouterr().out


def _refused(args: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err


def test_bad_runs_are_refused_in_one_line(run: Run, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["predict", str(tmp_path / "nowhere"), "x"], capsys, "nowhere",
             "no such run directory")
    if run.task != "speech":
        # the WAV paths are checked before the run is read: give one that exists
        _refused(["transcribe", str(run.path), str(run.path / "config.yaml")], capsys,
                 f"a '{run.task}' run, not a speech one")
    else:
        _refused(["sample", str(run.path)], capsys, "is a 'speech' run, not a language model")
    broken = tmp_path / "broken"
    shutil.copytree(run.path, broken)
    weights = next(broken.glob("best-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    _refused(["evaluate", str(broken), "--data", str(run.valid)], capsys, "truncated or corrupt")
    # a description edited to disagree with the weights
    shutil.rmtree(broken)
    shutil.copytree(run.path, broken)
    pointer = broken / "best.json"
    meta = json.loads(pointer.read_text())
    model = meta["task"]["model"]
    recurrent = model.get("recurrent") or model.get("encoder") or model
    recurrent["hidden"] = int(recurrent["hidden"]) + 1
    pointer.write_text(json.dumps(meta))
    # refused by the task's validated loading (rnnkit.tasks.common.load_task_model)
    _refused(["predict", str(pointer)], capsys, "best.json", "do not fit the model")


def test_bad_inputs_are_refused_in_one_line(run: Run, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = str(run.path)
    if run.task == "digits":
        _refused(["predict", path, "a sentence for a digits model"], capsys,
                 "'a sentence for a digits model'", "8×8 image")
        text = tmp_path / "note.txt"
        text.write_text("hello")
        _refused(["predict", path, str(text)], capsys, "note.txt", "not an image file")
        # a non-finite pixel is read as a number and refused as a pixel (was int('nan') failing)
        for bad in ("nan", "inf", "1e3"):
            _refused(["predict", path, " ".join(["0"] * 63 + [bad])], capsys, "input 1",
                     "pixel values must be in 0-16")
    elif run.task == "speech":
        text = tmp_path / "note.wav"
        text.write_text("not audio")
        _refused(["predict", path, str(text)], capsys, "note.wav", "not a readable PCM WAV file")
        _refused(["transcribe", path, str(tmp_path / "gone.wav")], capsys, "gone.wav", "no such audio file")
    elif run.task == "charlm":
        _refused(["predict", path, "Zebra"], capsys, "'Z' (U+005A)", "vocabulary")
    elif run.task == "music":
        text = tmp_path / "primer.mid"
        text.write_text("not midi")
        _refused(["predict", path, str(text)], capsys, "primer.mid", "not a Standard MIDI File")
    else:
        _refused(["predict", path, "--beam", "2", "x"] if run.task != "translate"
                 else ["predict", path, "--temperature", "2", "x"], capsys, "is not an option")
    listing = tmp_path / "inputs.txt"
    listing.write_text("first\n\nthird\n")
    _refused(["predict", path, "--input", str(listing)], capsys, "inputs.txt, line 2: empty line")
    _refused(["evaluate", path, "--data", str(tmp_path / "missing.data")], capsys, "missing.data")


TEST_SPLITS = {"digits", "tagging", "music"}  # the tiny runs' data with a test split


def test_training_ends_with_a_report(run: Run) -> None:
    from rnnkit.train.metrics import read_metrics

    records = read_metrics(run.path / "metrics.jsonl")
    tests = [r for r in records if r.get("kind") == "test"]
    best_step = load_checkpoint(run.path / "best.json").meta["step"]
    if run.task in TEST_SPLITS:
        assert len(tests) == 1 and tests[0]["step"] == best_step and "loss" in tests[0]
    else:
        assert tests == []
    if run.task == "music":
        from rnnkit.tasks.midi import read_midi

        assert read_midi(run.path / "sample.mid").shape[0] == 8 + 64
        assert (run.path / "sample.png").is_file()
    if run.task in ("digits", "sentiment", "speech"):
        assert (run.path / "confusion.png").is_file()


@pytest.mark.parametrize("run", ["sentiment", "digits"], indirect=True)  # a text and an image task
def test_stdin_big_files_and_batches(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = rnnkit.load(run.path)
    line = ("the film was great" if run.task == "sentiment"
            else " ".join(str(int(v)) for v in run.inputs[0].flatten()))
    many = [line if i % 2 else line.replace("great", "dull") for i in range(300)]
    # batched or one by one, the same answers
    one_by_one = [pipe.predict(pipe.parse(x)) for x in many[:5]]
    batched = pipe.predict([pipe.parse(x) for x in many[:5]], batch_size=4)
    for a, b in zip(batched, one_by_one):  # (equal up to the GEMMs' summation order)
        assert a.label == b.label and a.probability == pytest.approx(b.probability, abs=1e-6)
    listing = tmp_path / "many.txt"
    listing.write_text("\n".join(many) + "\n")
    assert main(["predict", str(run.path), "--input", str(listing), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().split("\n")) == 300 and "300" in captured.err  # a progress bar
    assert main(["predict", str(run.path), "--input", str(listing), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(many[:3]) + "\n"))
    assert main(["predict", str(run.path)]) == 0
    assert len(capsys.readouterr().out.strip().split("\n")) == 3
