"""The contract between the Trainer and a task (charlm today; sentiment, tagging, ... later).

A task owns its data and its loss; the Trainer owns the loop: chunking for truncated BPTT,
carrying and detaching state, clipping, optimisation, evaluation, checkpoints and logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn


@dataclass
class Batch:
    """Inputs and targets with time on dim 0 (tensors, or tuples of them)."""

    inputs: Any
    targets: Any
    # True when row b continues row b of the previous batch's stream: the state is carried
    continues: bool = False

    @property
    def length(self) -> int:
        first = self.inputs[0] if isinstance(self.inputs, tuple) else self.inputs
        return int(first.shape[0])

    def time_slice(self, start: int, stop: int) -> Batch:
        if start == 0 and stop >= self.length:
            # the whole batch: per-sequence tensors (labels, lengths) must not be cut on dim 0
            return self
        def cut(value: Any) -> Any:
            if isinstance(value, tuple):
                return tuple(cut(v) for v in value)
            return value[start:stop]

        return Batch(cut(self.inputs), cut(self.targets), self.continues or start > 0)


@dataclass
class StepResult:
    loss: Tensor  # scalar, mean over the ``tokens`` predictions of the step
    state: Any  # the final recurrent state (None for stateless tasks)
    tokens: int


class Task(Protocol):
    name: str

    def num_batches(self) -> int:
        """Training batches per epoch."""
        ...

    def batch(self, index: int) -> Batch:
        """The training batch at global position ``index`` (any epoch); a pure function of it,
        so a resumed run sees exactly the data an uninterrupted one would."""
        ...

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics, lower is better for ``"loss"`` (required); no gradient, eval mode."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored in checkpoints so the model can be rebuilt."""
        ...

    # optional: ``chance_loss() -> float``, the training loss of a uniform guess (ln of the
    # number of classes for a cross-entropy); a loss far above it stops the run as diverged
