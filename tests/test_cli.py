"""The ``rnnkit`` command: help for every subcommand, and train → sample → evaluate end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rnnkit.cli import main

TEXT = "the cat sat on the mat. 고양이가 매트 위에 앉았다. বিড়াল 猫坐在垫子上。\n" * 12


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "sample", "transcribe", "hello"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: rnnkit {command}" in capsys.readouterr().out


def test_top_level_help_lists_the_subcommands() -> None:
    result = subprocess.run([sys.executable, "-m", "rnnkit.cli", "--help"], capture_output=True,
                            text=True, check=True)
    for command in ("train", "sample", "evaluate", "hello"):
        assert command in result.stdout


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "charlm", "--data", str(data), "--out", str(out), "--steps", "6",
            "--eval-every", "4", "--layers", "1", "--hidden", "16", "--embedding", "8",
            "--batch-size", "4", "--seq-len", "16", "--sample-length", "20", "--no-progress",
            *extra]


def test_train_sample_evaluate_end_to_end(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    assert main(_train_args(data, out, "--cell", "gru", "--reset", "before")) == 0
    printed = capsys.readouterr().out
    assert "nats/char" in printed and "--- sample 1" in printed
    for name in ("checkpoint.json", "metrics.jsonl", "curves.png", "config.yaml"):
        assert (out / name).is_file() and str(out / name) in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["cell"] == "gru" and config["model"]["reset"] == "before"

    assert main(["sample", str(out), "--prime", "고양이", "--length", "15", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    # a run directory means its best weights
    assert main(["sample", str(out / "best.json"), "--prime", "고양이", "--length", "15",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and first.startswith("고양이")

    assert main(["sample", str(out), "--prime", "dog"]) == 2
    assert "'d' (U+0064)" in capsys.readouterr().err

    assert main(["evaluate", str(out), "--data", str(data)]) == 0
    line = capsys.readouterr().out
    assert "nats/char" in line and "bits/char" in line


def test_config_file_repeats_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT, encoding="utf-8")
    assert main(_train_args(data, tmp_path / "a")) == 0
    assert main(["train", "charlm", "--config", str(tmp_path / "a" / "config.yaml"),
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    capsys.readouterr()
    weights = [next((tmp_path / r).glob("*.safetensors")).read_bytes() for r in ("a", "b")]
    assert weights[0] == weights[1]


def test_toml_config_and_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT, encoding="utf-8")
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\ncell = "rnn"\nhidden = 8\n[train]\nsteps = 2\n', encoding="utf-8")
    args = ["train", "charlm", "--data", str(data), "--config", str(toml), "--layers", "1",
            "--batch-size", "2", "--seq-len", "8", "--sample-length", "5", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "t")]) == 0
    saved = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert saved["model"]["cell"] == "rnn" and saved["train"]["steps"] == 2

    toml.write_text("[model]\nhiden = 8\n", encoding="utf-8")
    assert main([*args, "--out", str(tmp_path / "u")]) == 2
    assert "model.hiden is an unknown option; did you mean hidden?" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "t")]) == 2  # would overwrite a run
    assert "already holds a run" in capsys.readouterr().err


def test_resume_continues_to_the_same_weights(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT, encoding="utf-8")
    assert main(_train_args(data, tmp_path / "whole", "--dropout", "0.1", "--layers", "2")) == 0
    short = _train_args(data, tmp_path / "split", "--dropout", "0.1", "--layers", "2")
    short[short.index("--steps") + 1] = "3"
    assert main(short) == 0
    assert main(["train", "charlm", "--out", str(tmp_path / "split"), "--resume", "--steps", "6",
                 "--no-progress"]) == 0
    assert "resuming from step 3 of 6" in capsys.readouterr().out
    weights = [next((tmp_path / r).glob("*.safetensors")) for r in ("whole", "split")]
    import safetensors.torch

    a, b = (safetensors.torch.load_file(w) for w in weights)
    for key in a:
        if key.startswith("model/"):
            assert a[key].equal(b[key]), key


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_to_resume_from(tmp_path: Path) -> None:
    import signal
    import time

    data = tmp_path / "tiny.txt"
    data.write_text(TEXT * 5, encoding="utf-8")
    out = tmp_path / "run"
    args = _train_args(data, out)
    args[args.index("--steps") + 1] = "1000000"
    process = subprocess.Popen([sys.executable, "-m", "rnnkit.cli", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size > 2000):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "interrupted; continue with" in stdout
    assert main(["sample", str(out), "--length", "5"]) == 0


def test_predict_input_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    import argparse

    from rnnkit.commands.predict import read_inputs

    listing = tmp_path / "inputs.txt"  # Notepad's UTF-8: the mark was read into input 1
    listing.write_text("\ufeffa gem\r\nflat\r\n", encoding="utf-8")
    args = argparse.Namespace(inputs=[], input=str(listing))
    assert read_inputs(args, "sentiment") == ["a gem", "flat"]
