"""The music task on a tiny generated .mat file of piano rolls."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_file
from rnnkit.tasks import music
from rnnkit.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _rolls(count: int, seed: int) -> np.ndarray:
    """Arpeggios: one note per step climbing a C-major triad, in cells of various lengths."""
    rng = np.random.default_rng(seed)
    cells = np.empty((1, count), dtype=object)
    for i in range(count):
        steps = int(rng.integers(6, 14))
        roll = np.zeros((steps, 88), dtype=np.uint8)
        for t in range(steps):
            roll[t, 39 + (0, 4, 7)[t % 3]] = 1
        cells[0, i] = roll
    return cells


@pytest.fixture(scope="module")
def mat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scipy.io import savemat

    path = tmp_path_factory.mktemp("music") / "tiny.mat"
    savemat(str(path), {"traindata": _rolls(12, 0), "validdata": _rolls(4, 1),
                        "testdata": _rolls(4, 2)})
    return path


def _config(mat: Path, **train: object) -> dict:
    config = music.default_config()
    config["data"]["path"] = str(mat)
    config["model"]["recurrent"].update(hidden=16)
    config["train"].update({"steps": 4, "batch_size": 4, "eval_every": 2, **train})
    return config


def test_build_and_batches(mat: Path) -> None:
    task, _, source = music.build(_config(mat))
    assert task.counts == {"train": 12, "valid": 4, "test": 4} and "12 train" in source
    batch = task.batch(1)
    frames, lengths = batch.inputs, batch.targets
    assert frames.shape[1:] == (4, 88) and lengths.shape == (1, 4)
    assert int(lengths.max()) == frames.shape[0]
    assert torch.equal(batch.time_slice(0, frames.shape[0]).targets, lengths)
    assert torch.equal(task.batch(1).inputs, frames)


def test_nll_counts_every_predicted_step(mat: Path) -> None:
    task, model, _ = music.build(_config(mat))
    # a model that always says ½ costs 88·ln 2 per step, whatever the music
    for parameter in model.parameters():
        torch.nn.init.zeros_(parameter)
    assert task.nll(model, "test") == pytest.approx(88 * math.log(2), rel=1e-5)


def test_training_checkpoint_and_generation(mat: Path, tmp_path: Path) -> None:
    config = _config(mat)
    task, model, _ = music.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    result = trainer.fit()
    trainer.out_dir = tmp_path  # a checkpoint without the end-of-run plot: keeps the test fast
    trainer.save()
    assert math.isfinite(result.valid["loss"])
    loaded, _ = music.load_model(tmp_path)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    primer = task.rolls["test"][0][:3]
    roll = music.generate(loaded, primer, steps=5, seed=1, midi=tmp_path / "x.mid")
    assert roll.shape == (8, 88) and torch.equal(roll[:3], primer)
    assert (tmp_path / "x.mid").read_bytes()[:4] == b"MThd"
    assert torch.equal(music.generate(loaded, primer, steps=5, seed=1), roll)  # seeded


def test_learns_arpeggios(mat: Path) -> None:
    config = _config(mat, steps=150, eval_every=150, lr=2e-2)
    config["model"]["dropout"] = 0.0
    task, model, _ = music.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    assert task.nll(model, "test") < 3.0  # from 61 nats at ½ everywhere


def test_missing_split_is_named(tmp_path: Path) -> None:
    from scipy.io import savemat

    savemat(str(tmp_path / "bad.mat"), {"traindata": _rolls(2, 0)})
    with pytest.raises(ValueError, match="lacks validdata, testdata"):
        music.load_rolls(tmp_path / "bad.mat")


def test_reads_shared_jsb() -> None:
    path = shared_file("polyphonic/JSB_Chorales.mat")
    rolls = music.load_rolls(path)
    assert [len(rolls[s]) for s in ("train", "valid", "test")] == [229, 76, 77]
    assert rolls["train"][0].shape[1] == 88
