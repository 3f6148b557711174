"""Gradient clipping by value and by global norm; per-layer gradient norms."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from trainer_helpers import make_trainer

from rnnkit.train.gradients import clip_gradients, gradient_norms, layer_groups


def _params_with_grads(*grads: list[float]) -> list[nn.Parameter]:
    params = []
    for values in grads:
        p = nn.Parameter(torch.zeros(len(values)))
        p.grad = torch.tensor(values)
        params.append(p)
    return params


def test_clip_by_value_bounds_each_element() -> None:
    params = _params_with_grads([3.0, -0.2, -7.0], [0.5, 10.0])
    clip_gradients(params, clip_value=1.0, clip_norm=None)
    torch.testing.assert_close(params[0].grad, torch.tensor([1.0, -0.2, -1.0]))
    torch.testing.assert_close(params[1].grad, torch.tensor([0.5, 1.0]))


def test_clip_by_norm_bounds_the_global_norm_keeping_direction() -> None:
    params = _params_with_grads([3.0, 4.0], [12.0])  # global norm 13
    before = torch.cat([p.grad for p in params])
    clip_gradients(params, clip_value=None, clip_norm=1.0)
    after = torch.cat([p.grad for p in params])
    assert float(after.norm()) <= 1.0 + 1e-6
    torch.testing.assert_close(after, before / 13.0, rtol=1e-5, atol=1e-6)


def test_clip_by_norm_leaves_small_gradients_alone() -> None:
    params = _params_with_grads([0.3, 0.4])
    clip_gradients(params, clip_value=None, clip_norm=1.0)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.3, 0.4]))


def test_trainer_clips_and_records_the_unclipped_norms() -> None:
    trainer = make_trainer(steps=1, clip_norm=1e-3, clip_value=None)
    records: list[dict[str, Any]] = []
    trainer.on_step = lambda _, record: records.append(record)
    trainer.fit()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    assert float(grads.norm()) <= 1e-3 * (1 + 1e-4)
    assert records[0]["grad_norm"] > 1e-3  # logged before clipping: explosion stays visible

    trainer = make_trainer(steps=1, clip_norm=None, clip_value=1e-4)
    trainer.fit()
    for p in trainer.model.parameters():
        assert float(p.grad.abs().max()) <= 1e-4


def test_layer_groups_one_per_recurrent_layer() -> None:
    groups = layer_groups(make_trainer().model)
    assert sorted(groups) == ["decoder", "embedding", "rnn.l0", "rnn.l1"]
    total, per_group = gradient_norms(groups)  # no gradients yet
    assert total == 0.0 and set(per_group) == set(groups)
