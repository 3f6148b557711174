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
    """Inputs and targets with time on dim 0 and the batch on dim 1 (tensors, or tuples of
    them; per-example values are (1, B, ...))."""

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

    @property
    def rows(self) -> int:
        """Examples (or streams) in the batch: dim 1 of its tensors."""
        from rnnkit.train.distributed import batch_rows

        rows = batch_rows(self.inputs)
        if rows is None:
            raise ValueError("a batch needs time-major tensors (T, B, ...) to be shared by ranks")
        return rows

    def shard(self, rank: int, world_size: int) -> Batch:
        """The rows rank ``rank`` of ``world_size`` trains on (:func:`shard_span`'s rule).

        Every tensor of the batch, inputs and targets, is time-major with the batch on dim 1
        (per-example values as (1, B, ...), see ``tasks.common.per_sequence``): one generic cut
        serves every task. An empty tensor (an absent value, e.g. no intents) is kept as it is;
        any other tensor whose dim 1 is not the batch is refused, naming its shape."""
        from rnnkit.train.distributed import shard_span

        if world_size == 1:
            return self
        return self.select_rows(*shard_span(self.rows, rank, world_size))

    def select_rows(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) of every tensor (dim 1)."""
        from rnnkit.train.distributed import shard_rows

        rows = self.rows

        def check(value: Any) -> None:
            if isinstance(value, tuple):
                for v in value:
                    check(v)
            elif value.numel() and (value.dim() < 2 or value.shape[1] != rows):
                raise ValueError(f"cannot share a batch of {rows} rows: a tensor of shape "
                                 f"{tuple(value.shape)} has no batch dimension 1 (see Batch)")

        check(self.inputs)
        check(self.targets)
        return Batch(shard_rows(self.inputs, start, stop), shard_rows(self.targets, start, stop),
                     self.continues)


@dataclass
class StepResult:
    loss: Tensor  # scalar, mean over the ``tokens`` predictions of the step
    state: Any  # the final recurrent state (None for stateless tasks)
    tokens: int
    # the number of terms ``loss`` is the mean of, when not ``tokens`` (e.g. sequences, for a
    # per-sequence mean): ranks weight their gradients by it to reproduce the global mean
    weight: float | None = None


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
