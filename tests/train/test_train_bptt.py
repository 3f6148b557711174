"""Full and truncated BPTT: chunking, equivalence at k = T, detached carried state."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trainer_helpers import make_trainer

from rnnkit.train import Trainer, chunk_spans


def test_chunk_spans() -> None:
    assert chunk_spans(10, None) == [(0, 10)]
    assert chunk_spans(10, 10) == [(0, 10)]
    assert chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def test_truncation_at_full_length_equals_full_bptt() -> None:
    full = make_trainer(bptt=None, steps=1)
    truncated = make_trainer(bptt=10, steps=1)  # seq_len is 10
    full.fit()
    truncated.fit()
    grads_full, grads_truncated = _grads(full), _grads(truncated)
    assert grads_full.keys() == grads_truncated.keys()
    for name in grads_full:
        assert torch.equal(grads_full[name], grads_truncated[name]), name
    for a, b in zip(full.model.parameters(), truncated.model.parameters()):
        assert torch.equal(a, b)


def test_second_chunk_gradient_starts_from_the_detached_first_chunk_state() -> None:
    # SGD with lr 0: weights do not move, so a manual computation can replay both chunks (set on
    # the optimizer: train.lr itself must be positive)
    trainer = make_trainer(bptt=5, steps=2, optimizer="sgd", lr=1.0, schedule="none")
    trainer.optimizer.param_groups[0]["lr"] = 0.0
    trainer.fit()
    grads = _grads(trainer)

    model, batch = trainer.model, trainer.task.batch(0)
    model.zero_grad()
    with torch.no_grad():
        _, state = model(batch.inputs[:5])
    logits, _ = model(batch.inputs[5:10], state)
    F.cross_entropy(logits.flatten(0, 1), batch.targets[5:10].flatten()).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_carried_state_is_detached() -> None:
    trainer = make_trainer(bptt=5, steps=3)
    received: list[Any] = []
    original = trainer.task.step

    def recording_step(model: Any, batch: Any, state: Any) -> Any:
        received.append(state)
        return original(model, batch, state)

    trainer.task.step = recording_step  # type: ignore[method-assign]
    trainer.fit()
    assert received[0] is None  # a new stream starts from zeros
    for state in received[1:]:
        assert state is not None  # chunks 2 and 3 continue the streams
        for tensor in state:
            assert not tensor.requires_grad and tensor.grad_fn is None


def test_state_carried_across_batches_and_reset_at_epoch() -> None:
    trainer = make_trainer(bptt=None)
    task = trainer.task
    assert not task.batch(0).continues
    assert task.batch(1).continues
    assert not task.batch(task.num_batches()).continues  # a new epoch restarts the streams
    # row b of batch 1 continues row b of batch 0 (batchify layout)
    first, second = task.batch(0), task.batch(1)
    assert torch.equal(first.targets[-1], second.inputs[0])
