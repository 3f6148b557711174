"""Checkpoints: exact resume, refusal of corrupt or truncated files, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import make_trainer

from rnnkit.train import CheckpointError, load_checkpoint


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_best_validation_weights_are_kept_for_inference(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=6, eval_every=1)
    losses = iter([3.0, 2.0, 2.5, 1.5, 4.0, 5.0])
    trainer.task.evaluate = lambda model: {"loss": next(losses)}  # type: ignore[method-assign]
    kept = {}
    trainer.on_step = lambda t, _: kept.setdefault(t.step, {k: v.clone() for k, v in
                                                             t.model.state_dict().items()})
    trainer.fit()
    best = load_checkpoint(tmp_path / "best.json")
    assert best.meta["step"] == 4 and best.meta["valid"] == {"loss": 1.5}
    assert best.meta["task"]["name"] == "charlm"
    for name, value in best.group("model").items():
        assert torch.equal(value, kept[4][name]), name
    assert [p.name for p in tmp_path.glob("best-*.safetensors")] == ["best-00000004.safetensors"]
    assert load_checkpoint(tmp_path).meta["step"] == 6  # the resumable checkpoint is the last


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path: Path) -> None:
    import os
    import signal

    trainer = make_trainer(tmp_path)
    trainer.on_step = lambda t, _: os.kill(os.getpid(), signal.SIGTERM) if t.step == 3 else None
    before = signal.getsignal(signal.SIGTERM)
    result = trainer.fit()
    assert (result.reason, result.step) == ("interrupted", 3)
    assert load_checkpoint(tmp_path).meta["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    # dropout draws from the torch RNG, so this also checks the RNG state is restored
    whole = make_trainer(tmp_path / "whole", dropout=0.2)
    whole.fit()

    first = make_trainer(tmp_path / "split", dropout=0.2)
    # step 5 stops mid-batch (bptt 5 of seq_len 10 → chunk 1 of batch 2), between evaluations
    first.on_step = lambda t, _: t.request_stop() if t.step == 5 else None
    assert first.fit().reason == "interrupted"
    assert load_checkpoint(tmp_path / "split").meta["position"] == [2, 1]

    resumed = make_trainer(tmp_path / "split", dropout=0.2, seed=99)  # other init: overwritten
    resumed.load(load_checkpoint(tmp_path / "split"))
    assert resumed.fit().step == 12

    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    optim_a, optim_b = whole.optimizer.state_dict(), resumed.optimizer.state_dict()
    for pid, values in optim_a["state"].items():
        for key, value in values.items():
            assert torch.equal(value, optim_b["state"][pid][key]), (pid, key)
    # the metrics log holds each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").open()
             if '"train"' in line]
    assert steps == list(range(1, 13))


def test_runs_with_the_same_seed_are_identical() -> None:
    a, b = make_trainer(dropout=0.1), make_trainer(dropout=0.1)
    a.fit()
    b.fit()
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)


def _trained(out: Path) -> Path:
    make_trainer(out, steps=4).fit()
    return out


def test_corrupt_weights_are_refused_naming_the_file(tmp_path: Path) -> None:
    out = _trained(tmp_path / "run")
    weights = next(out.glob("checkpoint-*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{weights.name}.*corrupt"):
        load_checkpoint(out)


def test_truncated_weights_are_refused_naming_the_file(tmp_path: Path) -> None:
    out = _trained(tmp_path / "run")
    weights = next(out.glob("checkpoint-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{weights.name}.*truncated"):
        load_checkpoint(out)


def test_truncated_json_is_refused_naming_the_file(tmp_path: Path) -> None:
    out = _trained(tmp_path / "run")
    pointer = out / "checkpoint.json"
    pointer.write_text(pointer.read_text()[:200])
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is corrupt or truncated"):
        load_checkpoint(out)


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path)


def test_a_new_checkpoint_replaces_the_old_one(tmp_path: Path) -> None:
    make_trainer(tmp_path, steps=8, eval_every=4).fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best-00000008.safetensors", "best.json", "checkpoint-00000008.safetensors",
                     "checkpoint.json", "curves.png", "metrics.jsonl"]
    assert load_checkpoint(tmp_path).meta["step"] == 8
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_checkpoint_holds_no_pickle(tmp_path: Path) -> None:
    make_trainer(tmp_path, steps=4).fit()
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert {"rng", "optimizer", "train_config", "task", "step", "position"} <= set(meta)
    assert set(meta["rng"]) == {"torch", "numpy", "python"}
    assert meta["task"]["vocab"]["symbols"]


def test_bad_checkpoint_on_resume_leaves_the_run_untouched(tmp_path: Path) -> None:
    from rnnkit.cli import main

    data = tmp_path / "tiny.txt"
    data.write_text("abcabcabd " * 100)
    out = tmp_path / "run"
    args = ["train", "charlm", "--data", str(data), "--out", str(out), "--steps", "4",
            "--hidden", "8", "--layers", "1", "--batch-size", "2", "--seq-len", "8",
            "--sample-length", "5", "--no-progress"]
    assert main(args) == 0
    weights = next(out.glob("checkpoint-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    before = _snapshot(out)
    assert main([*args, "--resume", "--steps", "8"]) == 2
    assert _snapshot(out) == before
