"""The digits task: fixed stratified splits, pure batches, rows vs columns, checkpoint round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rnnkit.tasks import digits
from rnnkit.tasks.common import EpochPlan
from rnnkit.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _config(**train: object) -> dict:
    config = digits.default_config()
    config["model"]["recurrent"].update(hidden=16)
    config["train"].update({"steps": 6, "batch_size": 32, "eval_every": 3, **train})
    return config


def test_splits_are_disjoint_stratified_and_fixed() -> None:
    _, labels = digits.load_images()
    data = digits.DigitsDataConfig()
    train, valid, test = digits.split_indices(labels, data)
    assert len(train) + len(valid) + len(test) == labels.numel() == 1797
    assert not (set(train) & set(valid) or set(train) & set(test) or set(valid) & set(test))
    assert len(test) == 360  # 20 %
    assert set(labels[test].tolist()) == set(range(10))
    counts = torch.bincount(labels[test], minlength=10)
    assert int(counts.max() - counts.min()) <= 2  # stratified: every digit about equally often
    assert digits.split_indices(labels, data) == (train, valid, test)


def test_rows_and_columns_readers() -> None:
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 8, 8)
    rows = digits.to_sequence(images, "rows")  # (8, 2, 8)
    columns = digits.to_sequence(images, "columns")
    assert rows.shape == columns.shape == (8, 2, 8)
    assert torch.equal(rows[3, 1], images[1, 3])  # step 3 = row 3
    assert torch.equal(columns[3, 1], images[1, :, 3])  # step 3 = column 3
    with pytest.raises(ValueError, match="reader must be one of rows, columns"):
        digits.DigitsDataConfig(reader="pixels")


def test_batches_are_a_pure_function_of_their_index() -> None:
    task, _, _ = digits.build(_config())
    first, again = task.batch(5), task.batch(5)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert first.inputs.shape == (8, 32, 8) and first.targets.shape == (1, 32)
    assert float(first.inputs.min()) >= 0.0 and float(first.inputs.max()) <= 1.0
    # the Trainer's whole-batch time slice keeps every label
    assert torch.equal(first.time_slice(0, 8).targets, first.targets)
    # each epoch covers every training image once, in a new order
    plan = EpochPlan([8] * 10, 4, seed=1)
    epoch0 = [i for b in range(len(plan)) for i in plan.indices(b)]
    epoch1 = [i for b in range(len(plan), 2 * len(plan)) for i in plan.indices(b)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1


def test_truncated_bptt_is_refused() -> None:
    with pytest.raises(ValueError, match="leave bptt unset"):
        digits.build(_config(bptt=4))


def test_training_checkpoint_and_classify(tmp_path: Path) -> None:
    config = _config()
    task, model, _ = digits.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False)
    result = trainer.fit()
    trainer.out_dir = tmp_path  # a checkpoint without the end-of-run plot: keeps the test fast
    trainer.save()
    assert set(result.valid) == {"loss", "accuracy"} and math.isfinite(result.valid["loss"])
    loaded, data, _ = digits.load_model(tmp_path)
    assert data.reader == "rows"
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    images, _ = digits.load_images()
    predicted = digits.classify(loaded, images[:5])
    assert len(predicted) == 5 and all(0 <= p < 10 for p in predicted)
    counts = digits.confusion_on_test(task, loaded)
    assert counts.shape == (10, 10) and int(counts.sum()) == 360


@pytest.mark.slow
def test_learns_digits() -> None:
    config = _config(steps=300, eval_every=300)
    config["model"]["recurrent"].update(hidden=64)
    task, model, _ = digits.build(config)
    Trainer(model, task, TrainConfig.from_dict(config["train"]), progress=False).fit()
    references, predictions, _ = task.predictions(model, "test")
    assert digits.accuracy(references, predictions) > 0.9
