"""Fault test: a real ``rnnkit train charlm`` process is killed (``kill -9`` during the run and
inside checkpoint writes, a double SIGTERM 5 ms apart), resumed, and must end bit-for-bit where
an uninterrupted run ends, with the same metrics record for record (wall-clock fields aside).

``RNNKIT_FAULT_SLEEP_IN_WRITE`` makes every atomic write pause with its temporary file written
but not yet renamed, so a kill can be aimed inside a checkpoint write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rnnkit.train.atomic import SLEEP_ENV, TEMP_PATTERN
from rnnkit.train.metrics import read_metrics

WALL_CLOCK = ("time",)


def _text() -> str:
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "rho", "sigma", "안녕"]
    return " ".join(rng.choice(words) for _ in range(900))


def _args(data: Path, out: Path, steps: int) -> list[str]:
    return ["train", "charlm", "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--hidden", "16", "--layers", "2", "--embedding", "8", "--batch-size", "4",
            "--seq-len", "12", "--bptt", "6", "--dropout", "0.1", "--eval-every", "10",
            "--checkpoint-every", "3", "--sample-length", "5", "--no-progress", "--threads", "1"]


def _env(sleep: float | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(SLEEP_ENV, None)
    if sleep is not None:
        env[SLEEP_ENV] = str(sleep)
    return env


def _run(args: list[str], sleep: float | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "rnnkit.cli", *args], capture_output=True,
                            text=True, env=_env(sleep), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def _start(args: list[str], sleep: float | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "rnnkit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(sleep))


def _step(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _wait(process: subprocess.Popen[str], condition: Callable[[], bool], what: str,
          timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _temp(out: Path, prefix: str) -> bool:
    return any(TEMP_PATTERN.match(p.name) and p.name.startswith(prefix) for p in out.iterdir())


def _kill9(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def _final_state(out: Path) -> dict[str, Any]:
    """What must be bit-identical: the SHA-256 of every tensor file (model, optimizer, carried
    state), the RNG states and position, and the metrics without wall-clock fields."""
    pointer = json.loads((out / "checkpoint.json").read_text())
    best = json.loads((out / "best.json").read_text())
    records = [{k: v for k, v in r.items() if k not in WALL_CLOCK}
               for r in read_metrics(out / "metrics.jsonl")]
    return {"weights": pointer["weights_sha256"], "step": pointer["step"],
            "rng": pointer["rng"], "position": pointer["position"],
            "best": (best["step"], best["weights_sha256"]), "metrics": records}


def _compare(out: Path, reference: Path) -> None:
    got, want = _final_state(out), _final_state(reference)
    assert len(got["metrics"]) == len(want["metrics"])
    for a, b in zip(got["metrics"], want["metrics"]):
        assert a == b
    assert got == want
    assert not [p.name for p in out.iterdir() if TEMP_PATTERN.match(p.name)]
    assert [p.name for p in out.glob("*.safetensors")] != []
    assert len(list(out.glob("checkpoint-*.safetensors"))) == 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(_text(), encoding="utf-8")
    return path


def test_kill_inside_a_checkpoint_write_and_double_sigterm_then_resume_is_bit_identical(
        corpus: Path, tmp_path: Path) -> None:
    steps = 24
    reference = tmp_path / "reference"
    _run(_args(corpus, reference, steps))

    out = tmp_path / "faulty"
    args = _args(corpus, out, steps)
    # kill -9 with the weights of a checkpoint written to a temporary file, not yet renamed
    process = _start(args, sleep=0.3)
    _wait(process, lambda: _step(out) >= 3 and _temp(out, ".checkpoint-"), "a weights write")
    _kill9(process)
    assert _temp(out, ".checkpoint-")  # the kill left the half-done write behind
    killed_at = _step(out)

    # resumed, then stopped by two SIGTERMs 5 ms apart: one clean stop, one checkpoint
    # (slow writes keep the run inside its training loop, where the handler is, when they land)
    process = _start([*args, "--resume"], sleep=0.3)
    _wait(process, lambda: _step(out) > killed_at, "a checkpoint after the resume")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "interrupted; continue with" in stdout
    assert not _temp(out, ".")  # the stale temporary file of the kill is gone
    assert killed_at < _step(out) < steps

    _run([*args, "--resume"])
    _compare(out, reference)


@pytest.mark.slow
def test_repeated_kills_anywhere_then_resume_is_bit_identical(corpus: Path, tmp_path: Path) -> None:
    steps = 60
    reference = tmp_path / "reference"
    _run(_args(corpus, reference, steps))
    out = tmp_path / "faulty"
    args = _args(corpus, out, steps)
    # (where the kill lands, sleep inside writes, what to wait for)
    plans: list[tuple[str, float | None, Callable[[], bool]]] = [
        ("during the steps", None, lambda: _step(out) >= 6),
        ("inside a weights write", 0.2, lambda: _temp(out, ".checkpoint-")),
        ("inside a pointer write", 0.2, lambda: _temp(out, ".checkpoint.json")),
        ("inside a best.json write", 0.2, lambda: _temp(out, ".best")),
        ("right after a checkpoint", None, lambda: _step(out) >= 40),
    ]
    first = True
    for what, sleep, condition in plans:
        before = _step(out)
        process = _start(args if first else [*args, "--resume"], sleep=sleep)
        _wait(process, lambda before=before, condition=condition:
              _step(out) > before and condition(), what)
        _kill9(process)
        first = False
        assert _step(out) >= before  # the last checkpoint always survives
    _run([*args, "--resume"])
    _compare(out, reference)
