"""Issue 10's command-line traps: bad paths, checks before training, divergence, resume, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rnnkit.cli import main

TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 30
SMALL = ["--layers", "1", "--hidden", "8", "--embedding", "4", "--batch-size", "2", "--seq-len",
         "8", "--sample-length", "5", "--no-progress"]


def _text(tmp_path: Path) -> Path:
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT, encoding="utf-8")
    return data


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_data_files_as_a_single_string_is_one_file(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"files": str(_text(tmp_path))},
                                      "train": {"steps": 1, "eval_every": 1}}), encoding="utf-8")
    assert main(["train", "charlm", "--config", str(config), "--out", str(tmp_path / "r"),
                 *SMALL]) == 0
    capsys.readouterr()
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["files"] == [str(tmp_path / "tiny.txt")]


@pytest.mark.parametrize(("path", "expected"), [
    (".", "--data {path} holds no *.txt"),  # a folder: its text files, and it has none
    ("/dev/null", "data file {path} is a character device, not a regular file"),
    ("missing.txt", "--data {path} does not exist"),
])
def test_data_that_is_not_a_file_is_named(path: str, expected: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if path == "/dev/null" and not Path(path).exists():
        pytest.skip("no /dev/null here")
    path = path if path.startswith("/") else str(tmp_path / path)
    assert main(["train", "charlm", "--data", path, "--out", str(tmp_path / "r"), *SMALL]) == 2
    assert expected.format(path=path) in _error(capsys)


def test_transcribe_names_a_directory_before_loading_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["transcribe", str(tmp_path / "no-run"), str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory, not a file; give a WAV file" in _error(capsys)


def test_out_naming_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _text(tmp_path)
    assert main(["train", "charlm", "--data", str(data), "--out", str(data), *SMALL]) == 2
    assert "--out names a file" in _error(capsys)


@pytest.mark.parametrize(("args", "expected"), [
    (["--temperature", "nan"], "argument --temperature: must be a finite number ≥ 0, got nan"),
    (["--temperature=-1"], "argument --temperature: must be a finite number ≥ 0, got -1.0"),
    (["--top-k", "0"], "argument --top-k: must be an integer ≥ 1, or none, got 0"),
    (["--length", "ten"], "argument --length: must be an integer ≥ 0, got 'ten'"),
])
def test_sample_options_are_checked_before_the_checkpoint_is_read(
        args: list[str], expected: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", str(tmp_path / "no-run"), *args]) == 2
    assert expected in _error(capsys)


@pytest.mark.parametrize(("args", "expected"), [
    (["predict", "RUN", "x", "--batch-size", "0"], "argument --batch-size: must be an integer ≥ 1, got 0"),
    (["predict", "RUN", "--beam", "two", "x"], "argument --beam: must be an integer ≥ 1, got 'two'"),
    (["predict", "RUN", "--temperature", "inf"], "argument --temperature: must be a finite number ≥ 0"),
    (["predict", "RUN", "--steps", "-1"], "argument --steps: must be an integer ≥ 0, got -1"),
    (["predict", "RUN", "x", "--bogus"], "--bogus is not an option of rnnkit predict"),
    (["evaluate", "RUN", "--data", "x", "--split", "dev"],
     "argument --split: must be one of train, valid, test, got 'dev'"),
    (["evaluate", "RUN", "--data", "x", "--batch-size", "1.5"], "argument --batch-size: must be an integer"),
    (["transcribe", "RUN", "a.wav", "--beam", "0"], "argument --beam: must be an integer ≥ 1, got 0"),
    (["sample", "RUN", "--threads", "0"], "argument --threads: must be an integer ≥ 1"),
])
def test_run_command_options_are_checked_before_the_run_is_read(
        args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path / "no-run") if a == "RUN" else a for a in args]
    assert main(args) == 2
    err = _error(capsys)
    assert expected in err and f"rnnkit {args[0]}: error:" in err and "no-run" not in err


def test_a_prime_outside_the_vocabulary_is_refused_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main(["train", "charlm", "--data", str(_text(tmp_path)), "--out", str(out),
                 "--prime", "Zebra", *SMALL]) == 2
    assert "sample.prime (--prime) contains 'Z' (U+005A)" in _error(capsys)
    assert not (out / "checkpoint.json").exists() and not (out / "config.yaml").exists()


def test_a_loss_far_above_a_uniform_guess_is_divergence(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main(["train", "charlm", "--data", str(_text(tmp_path)), "--out", str(out),
                 "--lr", "1e6", "--steps", "40", "--eval-every", "20", *SMALL]) == 2
    err = _error(capsys)
    assert "training diverged at step" in err and "far above the" in err
    # the wording of every run failure that says what survives (Trainer._intact)
    assert f"no checkpoint of this run was written to {out} yet" in err and "intact" not in err


def test_a_divergence_after_a_checkpoint_says_it_is_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _text(tmp_path)
    assert main(_run(tmp_path, "--steps", "2", "--eval-every", "2")) == 0
    capsys.readouterr()
    before = (tmp_path / "run" / "checkpoint.json").read_bytes()
    assert main(["train", "charlm", "--out", str(tmp_path / "run"), "--resume", "--lr", "1e6",
                 "--steps", "40", "--no-progress"]) == 2
    err = _error(capsys)
    assert f"the checkpoint of step 2 in {tmp_path / 'run'} is intact" in err
    assert (tmp_path / "run" / "checkpoint.json").read_bytes() == before


def _run(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "charlm", "--data", str(tmp_path / "tiny.txt"), "--out",
            str(tmp_path / "run"), *SMALL, *extra]


def test_resume_refuses_fixed_options_and_leaves_the_config_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _text(tmp_path)
    assert main(_run(tmp_path, "--steps", "2", "--eval-every", "2")) == 0
    capsys.readouterr()
    saved = (tmp_path / "run" / "config.yaml").read_text(encoding="utf-8")
    for flag, value in (("--batch-size", "4"), ("--hidden", "16"), ("--seed", "7"),
                        ("--seq-len", "9")):
        assert main(["train", "charlm", "--out", str(tmp_path / "run"), "--resume", flag,
                     value, "--no-progress"]) == 2
        assert "cannot change when resuming" in _error(capsys)
        assert (tmp_path / "run" / "config.yaml").read_text(encoding="utf-8") == saved
    assert main(["train", "charlm", "--out", str(tmp_path / "run"), "--resume", "--steps", "3",
                 "--no-progress"]) == 0  # the run still resumes
    assert "resuming from step 2 of 3" in capsys.readouterr().out


def test_resume_applies_and_records_a_new_learning_rate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _text(tmp_path)
    assert main(_run(tmp_path, "--steps", "2", "--eval-every", "2", "--schedule", "none")) == 0
    assert main(["train", "charlm", "--out", str(tmp_path / "run"), "--resume", "--steps", "4",
                 "--lr", "0.0005", "--no-progress"]) == 0
    assert "learning rate: 0.003 → 0.0005" in capsys.readouterr().out
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text(encoding="utf-8"))
    assert meta["step"] == 4
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0005)
    assert meta["train_config"]["lr"] == 0.0005
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["lr"] == 0.0005 and saved["train"]["steps"] == 4


@pytest.mark.slow
def test_a_second_interrupt_stops_at_once_without_a_traceback(tmp_path: Path) -> None:
    _text(tmp_path)
    args = _run(tmp_path, "--steps", "1000000", "--eval-every", "1000000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rnnkit.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size > 500):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    # the first signal may have finished the run before the second arrived
    assert process.returncode in (0, 130), stderr
    if process.returncode == 130:
        assert "interrupted; the last checkpoint written is intact" in stderr
    print(f"exit code {process.returncode}: {stderr.strip().splitlines()[-1:]}")
