"""Hostile-user probes of checkpoints and run files (issue 10, part C), against whichever rnnkit
is importable, so the same probes count main's behaviour and a branch's:

    PYTHONPATH=/path/to/tree/src python benchmarks/checkpoint_faults.py

Each probe ends as ``clear`` (one-line error naming the problem), ``traceback`` (any other
exception), ``silent`` (accepted, or a wrong/unsafe effect: a victim file overwritten, a file
outside the run read, a partial file left) or ``hang``; a probe of valid input ends ``ok``.
The tampering cases are the parametrized ones of tests/train/test_train_tamper.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import rnnkit

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests" / "train"))
spec = importlib.util.spec_from_file_location("tamper", HERE / "tests/train/test_train_tamper.py")
tamper = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
spec.loader.exec_module(tamper)  # type: ignore[union-attr]
from trainer_helpers import make_trainer  # noqa: E402

from rnnkit.tasks import charlm  # noqa: E402
from rnnkit.train import load_checkpoint  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


class HangError(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise HangError


def probe(name: str, action: Callable[[], Any], unsafe: Callable[[Any], bool] = lambda _: False,
          expect_error: bool = True) -> None:
    """Runs ``action``; ``unsafe(error_or_result)`` flags a wrong effect even behind an error."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        result = action()
        outcome = "silent" if expect_error or unsafe(result) else "ok"
        detail = repr(result)[:90]
    except HangError:
        outcome, detail = "hang", ""
    except (rnnkit.train.CheckpointError, ValueError) as error:
        text = str(error)
        outcome = "silent" if unsafe(error) else ("clear" if "\n" not in text else "traceback")
        detail = text[-110:]
    except BaseException as error:  # a probe records whatever escapes
        outcome = "silent" if unsafe(error) else "traceback"
        detail = f"{type(error).__name__}: {str(error)[:90]}"
    finally:
        signal.alarm(0)
    RESULTS.append((name, outcome, detail))
    print(f"{outcome:9s} {name}: {detail}", flush=True)


def copy_run(trained: Path, work: Path) -> Path:
    out = Path(tempfile.mkdtemp(dir=work)) / "run"
    shutil.copytree(trained, out)
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ckpt-probe-"))
    trained = work / "trained"
    make_trainer(trained, steps=4).fit()

    for name, edit, _ in tamper.METADATA_EDITS:
        out = copy_run(trained, work)
        tamper._edit(out, edit)
        probe(f"edited metadata: {name}", lambda out=out: charlm.load_model(out))
    for name, change in [
        ("tensor missing (forged SHA)", lambda t: t.pop("model/decoder.bias")),
        ("tensor of wrong shape (forged SHA)",
         lambda t: t.update({"model/decoder.weight": t["model/decoder.weight"][:, :5].contiguous()})),
    ]:
        out = copy_run(trained, work)
        tamper._rewrite_weights(out, change)
        probe(name, lambda out=out: charlm.load_model(out))
    out = copy_run(trained, work)
    tamper._rewrite_weights(out, lambda t: t.update({"carry/0": torch.zeros(2, 4, 17)}))

    def resume_wrong_carry(out: Path = out) -> Any:
        trainer = make_trainer(out, steps=5)
        trainer.load(load_checkpoint(out))
        return trainer.fit()

    probe("carried state of the wrong shape (forged SHA), resumed", resume_wrong_carry)
    for name, edit, _ in tamper.RESUME_EDITS:
        out = copy_run(trained, work)
        tamper._edit(out, edit)
        probe(f"edited resume state: {name}",
              lambda out=out: make_trainer(out).load(load_checkpoint(out)))

    # corrupt and truncated files
    out = copy_run(trained, work)
    (out / "checkpoint.json").write_text((out / "checkpoint.json").read_text()[:300])
    probe("truncated checkpoint.json", lambda: load_checkpoint(out))
    out = copy_run(trained, work)
    weights = next(out.glob("checkpoint-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:500])
    probe("truncated weights", lambda: load_checkpoint(out))
    out = copy_run(trained, work)
    meta = json.loads((out / "checkpoint.json").read_text())
    (out / meta["weights"]).write_bytes(b"\xff" * 64)
    meta.update(weights_sha256=hashlib.sha256(b"\xff" * 64).hexdigest(), weights_bytes=64)
    (out / "checkpoint.json").write_text(json.dumps(meta))
    probe("garbage safetensors with forged SHA", lambda: load_checkpoint(out))
    out = copy_run(trained, work)
    (out / "checkpoint.json").write_text("[" * 200_000 + "]" * 200_000)
    probe("JSON nested 200000 deep", lambda: load_checkpoint(out))
    out = copy_run(trained, work)
    (out / meta["weights"]).unlink()
    os.mkfifo(out / meta["weights"])
    probe("weights a FIFO", lambda: load_checkpoint(out))

    # reading outside the run directory
    secret = work / "secret.bin"
    secret.write_bytes(b"s" * 54321)
    for name, target in [("weights /etc/passwd", "/etc/passwd"),
                         ("weights ../secret.bin", "../../secret.bin"),
                         ("weights ../secret.safetensors", "../../secret.safetensors")]:
        out = copy_run(trained, work)
        shutil.copy(secret, work / "secret.safetensors")
        tamper._edit(out, lambda m, target=target: m.update(weights=target))
        size = str(os.path.getsize(target if target.startswith("/") else secret))
        probe(name, lambda out=out: load_checkpoint(out),
              unsafe=lambda e, size=size: not isinstance(e, Exception) or size in str(e)
              or "refus" not in str(e))
    out = copy_run(trained, work)
    meta = json.loads((out / "checkpoint.json").read_text())
    outside = work / "outside.safetensors"
    shutil.move(out / meta["weights"], outside)
    (out / meta["weights"]).symlink_to(outside)
    probe("weights a symlink leading outside", lambda: load_checkpoint(out))

    # writing: planted symlinks and the temporary file name
    out = work / "planted"
    out.mkdir()
    victims = []
    for name in ("curves.png", "metrics.jsonl", "checkpoint.json", "best.json",
                 "checkpoint-00000004.safetensors", "best-00000004.safetensors"):
        victim = work / f"victim-{name}"
        victim.write_text("precious")
        (out / name).symlink_to(victim)
        victims.append(victim)
    probe("a run with six planted symlinks", lambda: make_trainer(out, steps=4).fit(),
          unsafe=lambda _: any(v.read_bytes() != b"precious" for v in victims), expect_error=False)
    from rnnkit.train.atomic import write_text

    victim = work / "victim-temp"
    victim.write_text("precious")
    (work / f".config.yaml.tmp-{os.getpid()}").symlink_to(victim)
    probe("a symlink at the writer's temp name", lambda: write_text(work / "config.yaml", "a: 1\n"),
          unsafe=lambda _: victim.read_bytes() != b"precious", expect_error=False)

    # stale temporary files of a killed process
    out = copy_run(trained, work)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = out / f".checkpoint.json.tmp-{child.pid}"
    stale.write_text("x")

    def resume() -> None:
        trainer = make_trainer(out, steps=6)
        trainer.load(load_checkpoint(out))
        trainer.fit()

    probe("stale temp file of a dead process after resume", resume,
          unsafe=lambda _: stale.exists(), expect_error=False)

    # double SIGTERM / SIGINT in the loop
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = work / f"double-{sig.name}"
        trainer = make_trainer(out, steps=12, eval_every=100, checkpoint_every=2)
        trainer.on_step = lambda t, _, sig=sig: (os.kill(os.getpid(), sig), os.kill(os.getpid(), sig)) \
            if t.step == 3 else None
        probe(f"double {sig.name} 0 ms apart", trainer.fit,
              unsafe=lambda r, out=out: load_checkpoint(out).meta["step"] not in (2, 3),
              expect_error=False)

    # a real file-size limit (disk full) on resume, through the CLI
    data = work / "tiny.txt"
    data.write_text("abcabcabd " * 100)
    out = work / "fsize"
    args = [sys.executable, "-m", "rnnkit.cli", "train", "charlm", "--data", str(data), "--out",
            str(out), "--hidden", "24", "--layers", "1", "--batch-size", "2", "--seq-len", "8",
            "--sample-length", "5", "--eval-every", "4", "--no-progress", "--threads", "1"]
    subprocess.run([*args, "--steps", "4"], capture_output=True, check=True)

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    run = subprocess.run([*args, "--steps", "8", "--resume"], capture_output=True, text=True,
                         preexec_fn=limited)
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name] + [
        p.name for p in out.glob("checkpoint-*") if "00000004" not in p.name]
    err = run.stderr.strip()
    outcome = ("traceback" if "Traceback" in err else "silent" if leftovers or run.returncode == 0
               else "clear" if err.count("\n") == 0 else "traceback")
    RESULTS.append(("file size limit on resume (CLI)", outcome, err[-110:]))
    print(f"{outcome:9s} file size limit on resume (CLI): {err[-110:]} leftovers={leftovers}")

    counts = Counter(outcome for _, outcome, _ in RESULTS)
    print(f"\n{len(RESULTS)} probes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
