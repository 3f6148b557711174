"""What the two long-memory benchmarks of Bai, Kolter & Koltun (2018) share: generated data.

Both problems are generated, never read: training batch ``index`` is drawn from a generator seeded
by ``(seed, index)`` (so a resumed run sees the same data), and the validation set is a fixed draw
from ``valid_seed``. The task modules :mod:`rnnkit.tasks.adding` and
:mod:`rnnkit.tasks.copymemory` define the data and the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.options import Options, option
from rnnkit.train.task import Batch, StepResult


@dataclass
class SyntheticDataConfig(Options):
    length: int = option(600, "T: the steps the model must carry information across", ge=1)
    valid_size: int = option(1000, "generated validation sequences", ge=1)
    valid_seed: int = option(7, "seed of the validation set", ge=0)
    epoch_batches: int = option(100, "batches per 'epoch' (progress bookkeeping only)", ge=1)
    eval_batch_size: int = option(250, "validation sequences evaluated in parallel", ge=1)


Generate = Callable[[int, int, torch.Generator], Batch]  # (batch size, length, generator)


class SyntheticTask:
    """A Trainer task over generated batches; ``loss`` turns (model, batch) into the mean loss."""

    def __init__(self, name: str, data: SyntheticDataConfig, model_config: Any, generate: Generate,
                 loss: Callable[[nn.Module, Batch], tuple[Tensor, int]], batch_size: int, seed: int
                 ) -> None:
        self.name, self.data, self.model_config = name, data, model_config  # model_config: to_dict()
        self.generate, self.loss, self.batch_size, self.seed = generate, loss, batch_size, seed
        self.valid = generate(data.valid_size, data.length, torch.Generator().manual_seed(data.valid_seed))

    def num_batches(self) -> int:
        return self.data.epoch_batches

    def batch(self, index: int) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.generate(self.batch_size, self.data.length, generator)

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        loss, count = self.loss(model, batch)
        return StepResult(loss, None, count)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0
        size = self.data.eval_batch_size
        inputs, targets = self.valid.inputs, self.valid.targets
        for start in range(0, self.data.valid_size, size):
            part = Batch(inputs[:, start:start + size], targets[:, start:start + size])
            loss, _ = self.loss(model, part)
            rows = part.inputs.shape[1]
            total, count = total + float(loss) * rows, count + rows
        return {"loss": total / count}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_config.to_dict(), "data": asdict(self.data)}
