"""Files a run writes: atomic, never through a planted symlink, disk full reported in one line
with nothing partial left, stale temporary files removed, metrics complete after a crash, and a
double signal that stops cleanly."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import make_trainer

from rnnkit.train import CheckpointError, atomic, load_checkpoint
from rnnkit.train.atomic import remove_stale_temps, write_bytes
from rnnkit.train.errors import RunWriteError
from rnnkit.train.metrics import read_metrics

WALL_CLOCK = ("time",)


def _records(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in read_metrics(path)]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if atomic.TEMP_PATTERN.match(p.name))


# --- symlinks and temporary files ------------------------------------------------------------


def test_a_planted_symlink_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "curves.png").symlink_to(victim)
    write_bytes(tmp_path / "curves.png", b"new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "curves.png").is_symlink()
    assert (tmp_path / "curves.png").read_bytes() == b"new"


def test_the_old_predictable_temp_name_cannot_be_used_against_the_writer(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / f".config.yaml.tmp-{os.getpid()}").symlink_to(victim)
    write_bytes(tmp_path / "config.yaml", b"a: 1\n")
    assert victim.read_text() == "precious"
    assert (tmp_path / "config.yaml").read_bytes() == b"a: 1\n"


def test_written_files_get_the_permissions_open_gives(tmp_path: Path) -> None:
    write_bytes(tmp_path / "atomic", b"1")  # mkstemp alone would give 0600
    (tmp_path / "plain").write_bytes(b"1")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_run_never_writes_through_planted_symlinks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    victims = {}
    for name in ("curves.png", "metrics.jsonl", "checkpoint.json", "best.json",
                 "checkpoint-00000004.safetensors", "best-00000004.safetensors"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (out / name).symlink_to(victim)
        victims[name] = victim
    make_trainer(out, steps=4).fit()
    for name, victim in victims.items():
        assert victim.read_text() == "precious", name
        assert not (out / name).is_symlink(), name
    assert load_checkpoint(out).meta["step"] == 4
    assert len(read_metrics(out / "metrics.jsonl")) == 4 + 1


def test_resume_refuses_a_metrics_file_that_is_a_symlink(tmp_path: Path) -> None:
    out = tmp_path / "run"
    make_trainer(out, steps=4).fit()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    trainer = make_trainer(out, steps=8)
    trainer.load(load_checkpoint(out))
    with pytest.raises(RunWriteError, match=r"metrics\.jsonl is a symbolic link"):
        trainer.fit()
    assert victim.read_text() == "precious\n"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = _dead_pid()
    live = os.getppid()
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / f".checkpoint.json.tmp-{dead}-ab12_x", out / f".curves.png.tmp-{dead}"]
    keep = [out / f".metrics.jsonl.tmp-{live}-zz9", out / ".hidden", out / "notes.tmp-1"]
    for path in stale + keep:
        path.write_text("x")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / f".best.json.tmp-{dead}-q").symlink_to(victim)  # a link is removed, not its target
    make_trainer(out, steps=4).fit()
    assert [p.name for p in stale if p.exists()] == []
    assert not (out / f".best.json.tmp-{dead}-q").is_symlink() and victim.read_text() == "precious"
    assert all(p.exists() for p in keep)  # a live writer's file and other names stay
    # on resume the run directory is ours alone: every temporary file of the pattern goes
    resumed = make_trainer(out, steps=8)
    resumed.load(load_checkpoint(out))
    resumed.fit()
    assert _leftovers(out) == []
    assert (out / ".hidden").exists() and (out / "notes.tmp-1").exists()


def test_remove_stale_temps_leaves_directories_alone(tmp_path: Path) -> None:
    (tmp_path / f".x.tmp-{_dead_pid()}").mkdir()
    assert remove_stale_temps(tmp_path, everything=True) == []


# --- disk full ----------------------------------------------------------------------------


class _FullDisk:
    """``os`` for the atomic writer, except that writing a file whose name contains ``match``
    writes half the bytes and then fails with ENOSPC, as a full disk does."""

    def __init__(self, match: str, error: int = errno.ENOSPC) -> None:
        self.match, self.error, self.failures = match, error, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if self.match in target:
            self.failures += 1
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(self.error, os.strerror(self.error))
        return os.write(fd, data)


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")


@needs_proc
@pytest.mark.parametrize("failing", ["checkpoint-00000008", "checkpoint.json"])
def test_disk_full_names_the_intact_checkpoint_and_leaves_nothing_partial(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(out, steps=12, eval_every=4)
    disk = _FullDisk(failing)

    def fill_disk(t: Any, _: Any) -> None:
        if t.step == 5:  # after the checkpoint of step 4
            monkeypatch.setattr(atomic, "os", disk)

    trainer.on_step = fill_disk
    with pytest.raises(RunWriteError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert message.startswith(f"disk full while writing {out}/")
    assert message.endswith(f"; the checkpoint of step 4 in {out} is intact")
    assert "\n" not in message and disk.failures == 1
    monkeypatch.setattr(atomic, "os", os)
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000004.safetensors"]
    assert load_checkpoint(out).meta["step"] == 4
    resumed = make_trainer(out, steps=12, eval_every=4)  # and the run goes on from there
    resumed.load(load_checkpoint(out))
    assert resumed.fit().step == 12


@needs_proc
def test_disk_full_before_any_checkpoint_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    monkeypatch.setattr(atomic, "os", _FullDisk("best-"))
    with pytest.raises(RunWriteError, match=r"disk full while writing .*best-00000004\.safetensors; "
                                            r"no checkpoint of this run was written to .* yet"):
        make_trainer(tmp_path, steps=4).fit()
    assert _leftovers(tmp_path) == [] and not list(tmp_path.glob("*.safetensors"))


def test_a_failing_metrics_write_names_the_intact_checkpoint(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnkit.train import trainer as trainer_module
    from rnnkit.train.metrics import MetricsLog

    class FullLog(MetricsLog):
        flushes = 0

        def flush(self, sync: bool = False) -> None:
            if sync:  # the second flush before a checkpoint (step 8) finds the disk full
                FullLog.flushes += 1
                if FullLog.flushes == 2:
                    raise RunWriteError(atomic.describe_os_error(OSError(errno.ENOSPC, "full"),
                                                                 self.path))
            super().flush(sync)

    monkeypatch.setattr(trainer_module, "MetricsLog", FullLog)
    with pytest.raises(RunWriteError, match=r"disk full while writing .*metrics\.jsonl; "
                                            r"the checkpoint of step 4 in .* is intact$"):
        make_trainer(tmp_path, steps=12, eval_every=4).fit()


@needs_proc
def test_the_cli_reports_a_full_disk_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    from rnnkit.cli import main

    data = tmp_path / "tiny.txt"
    data.write_text("abcabcabd " * 100)
    out = tmp_path / "run"
    monkeypatch.setattr(atomic, "os", _FullDisk("checkpoint-"))
    code = main(["train", "charlm", "--data", str(data), "--out", str(out), "--steps", "4",
                 "--hidden", "8", "--layers", "1", "--batch-size", "2", "--seq-len", "8",
                 "--sample-length", "5", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("rnnkit train: error: disk full while writing")
    assert _leftovers(out) == []


def _cli(args: list[str], fsize: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rnnkit.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300, preexec_fn=limit if fsize else None)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics of Linux")
def test_a_real_file_size_limit_is_one_line_and_the_checkpoint_survives(tmp_path: Path) -> None:
    data = tmp_path / "tiny.txt"
    data.write_text("abcabcabd " * 100)
    out = tmp_path / "run"
    args = ["train", "charlm", "--data", str(data), "--out", str(out), "--hidden", "24",
            "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--sample-length", "5",
            "--eval-every", "4", "--no-progress", "--threads", "1"]
    assert _cli([*args, "--steps", "4"]).returncode == 0
    weights = (out / "checkpoint-00000004.safetensors").stat().st_size
    assert weights > 16_000  # the limit below lets metrics and config through, not weights
    result = _cli([*args, "--steps", "8", "--resume"], fsize=16_000)
    err = result.stderr.strip()
    assert result.returncode == 2, err
    assert "Traceback" not in err and err.count("\n") == 0
    assert err.startswith("rnnkit train: error: file size limit reached while writing")
    assert err.endswith(f"the checkpoint of step 4 in {out} is intact")
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000004.safetensors"]
    assert load_checkpoint(out).meta["step"] == 4


# --- metrics after a crash -----------------------------------------------------------------


def test_read_metrics_drops_a_partial_last_line_and_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    assert read_metrics(path) == [{"kind": "train", "step": 1}]
    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl line 2 is not a metrics record"):
        read_metrics(path)


def test_metrics_after_a_crash_and_resume_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = make_trainer(tmp_path / "whole", steps=12, eval_every=3, checkpoint_every=2)
    whole.fit()

    out = tmp_path / "crashed"
    crashed = make_trainer(out, steps=12, eval_every=3, checkpoint_every=2)

    def crash(t: Any, _: Any) -> None:
        if t.step == 7:
            raise SystemExit("crash")  # no checkpoint at 7; the one of step 6 stays

    crashed.on_step = crash
    with pytest.raises(SystemExit):
        crashed.fit()
    metrics = out / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 25])  # the kill cut the last record in half
    resumed = make_trainer(out, steps=12, eval_every=3, checkpoint_every=2)
    resumed.load(load_checkpoint(out))
    resumed.fit()
    assert _records(metrics) == _records(tmp_path / "whole" / "metrics.jsonl")


# --- signals -------------------------------------------------------------------------------


def test_a_double_sigterm_stops_once_with_one_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=12, eval_every=100)

    def terminate_twice(t: Any, _: Any) -> None:
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.on_step = terminate_twice
    result = trainer.fit()
    assert (result.reason, result.step) == ("interrupted", 3)
    assert load_checkpoint(tmp_path).meta["step"] == 3


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture
                                                                   ) -> None:
    trainer = make_trainer(tmp_path, steps=12, eval_every=100, checkpoint_every=2)

    def interrupt_twice(t: Any, _: Any) -> None:
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here, mid-step

    trainer.on_step = interrupt_twice
    result = trainer.fit()
    assert result.reason == "interrupted"
    assert "stopped at once; the checkpoint of step 2" in capsys.readouterr().err
    assert load_checkpoint(tmp_path).meta["step"] == 2
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_a_second_signal_during_a_checkpoint_write_waits_for_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    from rnnkit.train import checkpoint as checkpoint_module

    real = checkpoint_module.write_bytes

    def interrupted_write(path: Path, data: bytes) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        real(path, data)

    trainer = make_trainer(tmp_path, steps=12, eval_every=100, checkpoint_every=2)
    monkeypatch.setattr(checkpoint_module, "write_bytes", interrupted_write)
    result = trainer.fit()
    assert (result.reason, result.step) == ("interrupted", 2)
    assert load_checkpoint(tmp_path).meta["step"] == 2


def test_ctrl_c_outside_training_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from rnnkit.cli import main
    from rnnkit.tasks import hello

    def interrupted(**_: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(hello, "run_hello", interrupted)
    assert main(["hello"]) == 130
    assert capsys.readouterr().err == "rnnkit hello: interrupted\n"


def test_divergence_before_any_checkpoint_does_not_claim_one(tmp_path: Path) -> None:
    from rnnkit.train import DivergenceError

    trainer = make_trainer(tmp_path, steps=10, checkpoint_every=4)
    original = trainer.task.step

    def poisoned(model: Any, batch: Any, state: Any) -> Any:
        result = original(model, batch, state)
        result.loss = result.loss * float("nan")
        return result

    trainer.task.step = poisoned  # type: ignore[method-assign]
    with pytest.raises(DivergenceError, match=r"step 1: the training loss is nan; no checkpoint of "
                                              r"this run was written to .* yet"):
        trainer.fit()
