"""The Trainer: full or truncated BPTT, clipping, optimisation, evaluation, checkpoints, resume.

One *step* is one optimizer update. With ``bptt = k`` each batch of T steps is cut into chunks
of k; the final state of a chunk is detached and carried into the next chunk (and into the next
batch when the task says the batch continues the same streams), so gradients never flow across a
chunk boundary while the forward computation sees the whole stream.

Under ``torchrun`` (several processes, see :mod:`rnnkit.train.distributed`) each rank trains on
its rows of every global batch through DistributedDataParallel, carries the state of its own
streams, and all ranks agree at every step on the loss, the token count and whether to stop;
rank 0 alone writes the run directory.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rnnkit.engine import precision
from rnnkit.options import OptionError
from rnnkit.train import distributed, rng
from rnnkit.train.atomic import remove_stale_temps
from rnnkit.train.checkpoint import (
    BEST,
    Checkpoint,
    CheckpointError,
    check_resume_meta,
    load_weights,
    save_checkpoint,
)
from rnnkit.train.config import TrainConfig
from rnnkit.train.distributed import Group, RankLostError, shard_span
from rnnkit.train.errors import RunWriteError
from rnnkit.train.gradients import clip_gradients, gradient_norms, layer_groups
from rnnkit.train.metrics import MetricsLog
from rnnkit.train.task import Batch, Task


class DivergenceError(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


def chunk_spans(length: int, bptt: int | None) -> list[tuple[int, int]]:
    """[start, stop) time spans of the BPTT chunks of a sequence of ``length`` steps."""
    if bptt is None or bptt >= length:
        return [(0, length)]
    return [(start, min(start + bptt, length)) for start in range(0, length, bptt)]


def detach_state(state: Any) -> Any:
    """The same state cut from the graph: the next chunk's gradients stop here."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    parts = [detach_state(s) for s in state]
    return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)


def _flatten_state(state: Any) -> list[Tensor]:
    if state is None:
        return []
    return [state] if isinstance(state, Tensor) else list(state)


@dataclass
class TrainResult:
    step: int
    reason: str  # "steps", "time", "early_stop" or "interrupted" (STOP_REASONS says them)
    valid: dict[str, float] = field(default_factory=dict)
    best_valid: float | None = None  # the best value of the monitored metric (train.monitor)
    checkpoint: Path | None = None
    metrics: Path | None = None
    plot: Path | None = None


def budget_total(config: TrainConfig, step: int, done: int, elapsed: float) -> int | None:
    """The step the run will stop at by the binding budget, for the progress bar's total and
    ETA: the step cap, or the step the time budget reaches at the pace so far (``done`` steps
    in ``elapsed`` seconds of this session), whichever comes first; None when unknown (no cap,
    and no pace yet)."""
    cap = config.steps
    if config.minutes is None or done == 0 or elapsed <= 0:
        return cap
    by_time = step + max(0, int((config.minutes * 60 - elapsed) * done / elapsed))
    return by_time if cap is None else min(cap, by_time)


def stop_words(reason: str, config: TrainConfig) -> str:
    """Why a run stopped, in words naming the option that set the limit."""
    if reason == "steps":
        return f"the step budget (train.steps = {config.steps}) is reached"
    if reason == "time":
        return f"the time budget (train.minutes = {config.minutes:g}) ran out"
    if reason == "early_stop":
        return (f"early stopping: no validation gain in {config.monitor} for "
                f"{config.early_stop} evaluations (train.early_stop)")
    if reason == "interrupted":
        return "interrupted (Ctrl-C or SIGTERM); its checkpoint is saved"
    return reason


class TaskStep(nn.Module):
    """The task's training step as a module, so that DistributedDataParallel runs it: DDP's
    hooks then average the gradient of every parameter (peepholes included) whatever model
    methods the task calls (``model(...)``, ``model.loss(...)``); its parameters are the
    model's."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Batch, state: Any) -> Any:
        return self.task.step(self.model, batch, state)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or Adam over the trainable parameters, with weight decay on all but those a model
    marks ``no_weight_decay`` (the direction v of a weight norm, w = g v / ‖v‖: decay cannot
    change w through v, only shrink ‖v‖; in a channel that gets no gradient, Adam then drives v
    towards 0 until ‖v‖² underflows and w = g v / 0 is inf — the BiTCN on SST died so)."""
    params = [p for p in model.parameters() if p.requires_grad]
    exempt = [p for p in params if getattr(p, "no_weight_decay", False)]
    groups: list[dict[str, Any]] | list[nn.Parameter] = params
    if exempt and config.weight_decay:  # one group otherwise, as before (checkpoints resume)
        groups = [{"params": [p for p in params if not getattr(p, "no_weight_decay", False)]},
                  {"params": exempt, "weight_decay": 0.0}]
    # torch's fused implementation updates every parameter in one kernel; its default on the CPU
    # is a Python loop over parameters, measured 14× slower for a 2.2 M-parameter, 16-tensor
    # model (Adam step 19.0 vs 1.3 ms, 1 thread) — about a fifth of a CoNLL tagger's step.
    # Same arithmetic (2e-7 apart after 20 steps). Resuming keeps what the checkpoint was made
    # with: load_state_dict restores the flag with the param groups.
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, fused=fused or None)
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay,
                            fused=fused or None)


class BudgetSchedule:
    """The "budget" schedule: the full rate for the first ``hold`` share of the run's budget,
    then a geometric decay that reaches ``final`` × the rate when the budget runs out.

    Progress p ∈ [0, 1] is the larger of step/steps and the share of the time budget used, so
    the decay follows whichever budget binds. A ``--resume`` gets a new time budget (as
    train.minutes does): the decay goes on from the progress the checkpoint holds and finishes
    within the new budget. Progress never goes back.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
        self.optimizer = optimizer
        self.steps, self.minutes = config.steps, config.minutes
        self.hold, self.final = config.budget_hold, config.budget_final
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.progress = 0.0
        self._session_start = 0.0  # progress when this session's time budget began

    def multiplier(self, progress: float) -> float:
        if progress <= self.hold:
            return 1.0
        return self.final ** ((min(progress, 1.0) - self.hold) / (1.0 - self.hold))

    def start_session(self) -> None:
        self._session_start = self.progress

    def advance(self, step: int, elapsed: float) -> None:
        """Sets the rate for the next step, after ``step`` steps and ``elapsed`` seconds of
        this session."""
        shares = [self.progress]
        if self.steps is not None:
            shares.append(step / self.steps)
        if self.minutes is not None:
            start = self._session_start
            shares.append(start + (1.0 - start) * elapsed / (self.minutes * 60))
        self.progress = min(1.0, max(shares))
        factor = self.multiplier(self.progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        base_lrs, progress = state["base_lrs"], float(state["progress"])
        if len(base_lrs) != len(self.base_lrs) or not 0 <= progress <= 1:
            raise ValueError(f"a budget schedule state of {len(base_lrs)} rates at progress "
                             f"{progress}")
        self.base_lrs, self.progress = [float(lr) for lr in base_lrs], progress


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    """The learning-rate schedule, stepped once per scheduled evaluation (None: constant rate)."""
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=config.monitor_mode, factor=config.plateau_factor,
            patience=config.plateau_patience)
    if config.schedule == "step":
        factor, full_rate = config.decay_factor, config.decay_after

        def multiplier(evaluations: int) -> float:
            return factor ** max(0, evaluations + 1 - full_rate)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    if config.schedule == "budget":
        return BudgetSchedule(optimizer, config)
    return None


class Trainer:
    """Trains ``model`` on ``task``; writes checkpoints, metrics and a plot into ``out_dir``."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        progress: bool = True,
        on_step: Callable[[Trainer, dict[str, Any]], None] | None = None,
        group: Group | None = None,
    ) -> None:
        self.group = group if group is not None else distributed.current()
        distributed.check_batch_size(config.batch_size, self.group)
        if config.precision == "bf16" and (missing := precision.bf16_missing()) is not None:
            raise OptionError("train.precision", f"is bf16, but {missing}")
        self.model = model
        self.task = task
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.on_step = on_step
        self.optimizer = _make_optimizer(model, config)
        self.scheduler = _make_scheduler(self.optimizer, config)
        if isinstance(self.scheduler, BudgetSchedule) and config.minutes and self.group.distributed:
            # each rank's clock differs a little: rates keyed to it would drift apart
            raise ValueError("train.schedule 'budget' with train.minutes runs in one process; "
                             "with several, key it to train.steps alone")
        self.groups = layer_groups(model)
        self.step = 0
        self.position = (0, 0)  # (batch index, chunk index) of the next step
        self.carry: Any = None
        self.best_valid: float | None = None
        self.evals_without_gain = 0
        self.last_valid: dict[str, float] = {}
        self.stop_reason: str | None = None
        self._resumed_from: int | None = None
        self._saved_step: int | None = None  # the step the run directory's checkpoint holds
        self._saving = False  # a second signal must not cut a checkpoint write short
        self._chance: float | None = None  # the task's loss of a uniform guess, nan: unknown
        self._requested: str | None = None  # a stop this rank asks for, agreed at the next step
        self._started = time.perf_counter()
        self._runner: nn.Module | None = None
        if self.group.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # every parameter is used by every step of every task: no find_unused_parameters
            # (its extra graph walk per step), and a parameter that were not would be an error
            self._runner = DistributedDataParallel(TaskStep(task, model))

    # --- checkpoints -----------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything needed to continue exactly: tensors, and JSON-able rest."""
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        optim = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, values in optim["state"].items():
            for key, value in values.items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{pid}/{key}"] = value
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        # each rank carries its own rows: gathered, the checkpoint holds the state of every
        # stream in the one-process layout (batch on dim 1)
        carry = distributed.gather_rows(_flatten_state(self.carry), self.group)
        for i, value in enumerate(carry):
            tensors[f"carry/{i}"] = value
        states = distributed.all_gather_object(rng.capture(), self.group)
        meta = {
            "step": self.step,
            "position": list(self.position),
            "carry": None if self.carry is None else ("tensor" if isinstance(self.carry, Tensor)
                                                      else len(carry)),
            "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars},
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "best_valid": self.best_valid,
            "evals_without_gain": self.evals_without_gain,
            "last_valid": self.last_valid,
            "rng": states[0],
            "train_config": self.config.to_dict(),
            "task": self.task.describe(),
            "world_size": self.group.world_size,
        }
        if self.group.distributed:  # dropout masks differ per rank: each continues its own
            meta["rng_ranks"] = states
        return tensors, meta

    def save(self) -> Path | None:
        if self.out_dir is None:
            return None
        tensors, meta = self.state_tensors()
        pointer = self._write(lambda: save_checkpoint(self.out_dir, tensors, meta))
        self._saved_step = self.step
        return pointer

    def save_best(self, valid: dict[str, float]) -> Path | None:
        """The weights of the best monitored validation value so far, as ``best.json``."""
        if self.out_dir is None:
            return None
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        meta = {"step": self.step, "valid": valid, "train_config": self.config.to_dict(),
                "task": self.task.describe()}
        return self._write(lambda: save_checkpoint(self.out_dir, tensors, meta, stem=BEST))

    def _write(self, write: Callable[[], Path]) -> Path | None:
        """Runs a checkpoint write that a second signal cannot cut short; on rank 0 alone, and
        a failure (disk full) stops every rank with the same message."""
        self._saving = True
        try:
            pointer, failure = None, None
            if self.group.is_main:
                try:
                    pointer = write()
                except RunWriteError as error:
                    if not self.group.distributed:
                        raise
                    failure = str(error)
            failure = distributed.broadcast_object(failure, self.group)
            if failure is not None:
                raise RunWriteError(failure if self.group.is_main else
                                    f"rank 0 could not write the run directory: {failure}")
            return pointer
        finally:
            self._saving = False

    def _intact(self) -> str:
        """Which checkpoint survives a failure now (for the one-line error)."""
        if self.out_dir is None:
            return "nothing was saved (no run directory)"
        if self._saved_step is None:
            return f"no checkpoint of this run was written to {self.out_dir} yet"
        return f"the checkpoint of step {self._saved_step} in {self.out_dir} is intact"

    def load(self, checkpoint: Checkpoint) -> None:
        """Restores a checkpoint written by :meth:`save` (weights, optimizer, RNG, position).

        The metadata is checked first (:func:`check_resume_meta`, tensor names and shapes
        against this model and optimizer): a hand-edited or foreign file is one CheckpointError
        naming it, never a KeyError from inside torch."""
        check_resume_meta(checkpoint)
        meta = checkpoint.meta
        saved_world = meta.get("world_size", 1)
        if saved_world != self.group.world_size:
            raise CheckpointError(
                f"{checkpoint.path} was written by a run on {saved_world} process(es); resume "
                f"it on {saved_world} (--nproc-per-node {saved_world}), not "
                f"{self.group.world_size}: each process's share of the streams and its random "
                "state continue from there")
        rng_states = meta["rng"]
        if self.group.distributed:
            ranks = meta.get("rng_ranks")
            if not isinstance(ranks, list) or len(ranks) != self.group.world_size:
                raise CheckpointError(f"{checkpoint.path}: rng_ranks must list the random state "
                                      f"of each of the {self.group.world_size} ranks")
            rng_states = ranks[self.group.rank]
        load_weights(checkpoint, self.model)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state: dict[int, dict[str, Any]] = {}
        for key, value in checkpoint.group("optim").items():
            pid, name = key.split("/", 1)
            index = int(pid)
            if index >= len(params) or (value.dim() > 0 and value.shape != params[index].shape):
                raise CheckpointError(
                    f"{checkpoint.path}: optimizer tensor optim/{key} of {checkpoint.weights} does "
                    f"not fit this model's parameters")
            state.setdefault(index, {})[name] = value
        for pid, values in meta["optimizer"]["scalars"].items():
            state.setdefault(int(pid), {}).update(values)
        batch_index, chunk = (int(x) for x in meta["position"])
        spans = chunk_spans(self.task.batch(batch_index).length, self.config.bptt)
        if chunk >= len(spans):
            raise CheckpointError(f"{checkpoint.path}: position {meta['position']} names chunk "
                                  f"{chunk} of a batch cut into {len(spans)}")
        try:
            self.optimizer.load_state_dict(
                {"state": state, "param_groups": meta["optimizer"]["param_groups"]})
            if self.scheduler is not None and meta.get("scheduler"):
                self.scheduler.load_state_dict(meta["scheduler"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as error:
            reason = f"missing key {error}" if isinstance(error, KeyError) else error
            raise CheckpointError(f"{checkpoint.path}: the optimizer, schedule or random state "
                                  f"cannot be restored: {reason}") from None
        carry = checkpoint.group("carry")
        # a bf16 run carries bf16 states (torch.nn's LSTM/RNN output dtype under autocast): read
        # as float32 (exact), they fit a run resumed with either train.precision
        carry = {key: value.float() if value.dtype == torch.bfloat16 else value
                 for key, value in carry.items()}
        if self.group.distributed and carry:  # this rank's rows of the gathered state
            rows = self.task.batch(batch_index).rows
            start, stop = shard_span(rows, self.group.rank, self.group.world_size)
            carry = {key: distributed.shard_rows(value, start, stop) for key, value in carry.items()}
        if meta.get("carry") == "tensor":
            self.carry = carry["0"]
        elif meta.get("carry"):
            self.carry = tuple(carry[str(i)] for i in range(int(meta["carry"])))
        self._check_carry(checkpoint, batch_index, spans[chunk][0])
        try:
            rng.restore(rng_states)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as error:
            raise CheckpointError(f"{checkpoint.path}: the random state cannot be restored: "
                                  f"{error}") from None
        self.step = int(meta["step"])
        self.position = (batch_index, chunk)
        self.best_valid = meta.get("best_valid", meta.get("best_valid_loss"))
        self.evals_without_gain = int(meta.get("evals_without_gain") or 0)
        self.last_valid = meta.get("last_valid") or {}
        self._resumed_from = self.step
        self._saved_step = self.step

    def _check_carry(self, checkpoint: Checkpoint, batch_index: int, start: int) -> None:
        """The carried state must fit the model: one time step of the batch it continues is run
        with it (no gradient; before the RNG states are restored, so nothing is perturbed)."""
        piece = self._shard(self.task.batch(batch_index).time_slice(start, start + 1))[0]
        if self.carry is None or not piece.continues:
            return
        try:
            with torch.no_grad(), self.autocast():
                self.task.step(self.model, piece, self.carry)
        except (RuntimeError, ValueError, IndexError, TypeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{checkpoint.path}: the carried recurrent state in "
                                  f"{checkpoint.weights} does not fit the model: {reason}") from None

    # --- one step --------------------------------------------------------------------------

    def _shard(self, batch: Batch) -> tuple[Batch, bool]:
        """This rank's rows of a global batch, and whether it has any. A rank left without rows
        (a short last batch of an epoch) runs the last row with weight 0: every rank must join
        the gradient all-reduce of every step."""
        if not self.group.distributed:
            return batch, True
        rows = batch.rows
        start, stop = shard_span(rows, self.group.rank, self.group.world_size)
        if start == stop:
            return batch.select_rows(rows - 1, rows), False
        return batch.select_rows(start, stop), True

    def _local_stop(self) -> tuple[float, float]:
        """(interrupted, out of time) as this rank sees them now, for the step's agreement."""
        budget = self.config.minutes
        late = budget is not None and time.perf_counter() - self._started >= budget * 60
        return float(self._requested is not None), float(late)

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimizer update on one chunk, from the carried (already detached) state.

        On several ranks ``batch`` is the global batch: this rank runs its rows, weights its
        mean loss by its share of the loss terms (so DDP's average of the gradients is the
        one-process gradient of the global mean) and agrees with the others on the loss, the
        tokens and whether to stop after this step, in one all-reduce of five numbers."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch, has_rows = self._shard(batch)
        state = self.carry if batch.continues else None
        with self.autocast():  # (the backward runs outside it, as torch recommends)
            if self._runner is not None:
                result = self._runner(batch, state)
            else:
                result = self.task.step(self.model, batch, state)
        loss = float(result.loss.detach())
        objective = result.loss
        tokens = result.tokens
        if self.group.distributed:
            weight = float(result.tokens if result.weight is None else result.weight) * has_rows
            interrupted, late = self._local_stop()
            total_weight, total_loss, tokens_sum, stops, lates = distributed.all_reduce_sum(
                [weight, loss * weight if has_rows else 0.0, float(result.tokens) * has_rows,
                 interrupted, late], self.group)
            loss = total_loss / total_weight if total_weight > 0 else math.nan
            tokens = int(tokens_sum)
            objective = result.loss * (weight * self.group.world_size / max(total_weight, 1e-300))
            self.stop_reason = "interrupted" if stops else "time" if lates else self.stop_reason
        if not math.isfinite(loss):  # the same value on every rank: all stop together
            raise DivergenceError(self._diverged(f"the training loss is {loss}"))
        limit = self._loss_limit()
        if limit is not None and loss > limit:
            raise DivergenceError(self._diverged(
                f"the training loss is {loss:.4g}, far above the {self._chance:.4g} of a "
                f"uniform guess"))
        self._backward(objective)
        total, per_group = gradient_norms(self.groups)
        if not math.isfinite(total):
            raise DivergenceError(self._diverged(f"the gradient norm is {total}"))
        clip_gradients(self.model.parameters(), self.config.clip_value, self.config.clip_norm)
        self.optimizer.step()
        if has_rows:
            self.carry = detach_state(result.state)
        return {"loss": loss, "tokens": tokens, "grad_norm": total, "grad_norms": per_group,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def autocast(self) -> torch.autocast:
        """The arithmetic of train.precision: bf16 autocast on the CPU, or nothing."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def _loss_limit(self) -> float | None:
        """A training loss above this is divergence, not learning: the task's loss of a uniform
        guess (``Task.chance_loss``, when it has one) times ten, and at least 10 nats above it.
        A model that trains is at or below the uniform guess after its first steps; Adam at a
        learning rate of 1e6 sits at millions of nats per symbol, finite but meaningless."""
        if self._chance is None:
            chance = getattr(self.task, "chance_loss", None)
            self._chance = float(chance()) if callable(chance) else float("nan")
        if not math.isfinite(self._chance):
            return None
        return max(10 * self._chance, self._chance + 10)

    def _backward(self, objective: Tensor) -> None:
        """Backpropagation; on several ranks DDP all-reduces the gradients during it, and a peer
        that died there is one RankLostError naming what survives."""
        if not self.group.distributed:
            objective.backward()
            return
        try:
            objective.backward()
        except RuntimeError as error:
            if not isinstance(error, torch.distributed.DistError) and not any(
                    word in str(error) for word in ("gloo", "Connection", "NCCL", "peer")):
                raise
            raise RankLostError(f"another rank stopped during the gradient all-reduce of step "
                                f"{self.step + 1}") from None

    def _diverged(self, what: str) -> str:
        where = f"; {self._intact()}" if self.out_dir else ""
        return (f"training diverged at step {self.step + 1}: {what}{where}. Try a lower --lr or "
                f"gradient clipping (--clip-norm / --clip-value)")

    def rescale_lr(self, factor: float) -> None:
        """Multiplies the learning rate by ``factor``, now and in the schedule's base rates.

        Used when a run is resumed with another ``--lr``: the optimizer state restored from the
        checkpoint carries the old rate, and a schedule keeps its cuts so far relative to it.
        """
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if self.scheduler is not None:
            if hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
            if hasattr(self.scheduler, "_last_lr"):
                self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics over the whole validation set, the same on every rank.

        On several ranks a task with ``evaluate_totals(model, rank, world_size)`` (sums over
        its share) and ``metrics_from_totals(totals)`` shares the work and all-reduces the
        totals; for any other task rank 0 evaluates and sends the metrics to the others."""
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                if not self.group.distributed:
                    metrics = self.task.evaluate(self.model)
                elif hasattr(self.task, "evaluate_totals"):
                    share = self.task.evaluate_totals(self.model, self.group.rank,
                                                      self.group.world_size)
                    keys = sorted(share)
                    sums = distributed.all_reduce_sum([share[k] for k in keys], self.group)
                    metrics = self.task.metrics_from_totals(dict(zip(keys, sums)))
                else:
                    metrics = self.task.evaluate(self.model) if self.group.is_main else {}
                    metrics = distributed.broadcast_object(metrics, self.group)
        finally:
            self.model.train()
        return metrics

    # --- the loop --------------------------------------------------------------------------

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stops at the next step boundary with a checkpoint (used by Ctrl-C and tests); on
        several ranks at the boundary after the next step's agreement, on every rank at once."""
        if self.group.distributed:
            self._requested = reason
        else:
            self.stop_reason = reason

    def fit(self) -> TrainResult:
        config = self.config
        metrics = plot = None
        log = None
        main = self.group.is_main
        if self.out_dir is not None and main:  # rank 0 alone writes the run directory
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # temporary files of killed writers; on resume the directory is ours alone
            remove_stale_temps(self.out_dir, everything=self._resumed_from is not None)
            metrics = self.out_dir / "metrics.jsonl"
            try:
                log = MetricsLog(metrics, keep_until_step=self._resumed_from)
            except RunWriteError as error:
                raise RunWriteError(f"{error}; {self._intact()}") from None
        checkpoint_every = config.checkpoint_every or config.eval_every
        bar = tqdm(total=config.steps, initial=self.step, file=sys.stderr, unit="step",
                   disable=not (self.progress and main), dynamic_ncols=True, leave=True)
        first_step = self.step
        started = self._started = time.perf_counter()
        tokens = 0
        self.stop_reason = self._requested = None
        if self.step == 0 and self._resumed_from is None:
            # dropout masks and any sampling then depend on the seed alone, not on what ran
            # between building the model and training it
            rng.seed_everything(config.seed)
        if isinstance(self.scheduler, BudgetSchedule):
            self.scheduler.start_session()
        previous_handler = self._install_sigint()
        try:
            while self.stop_reason is None and (config.steps is None or self.step < config.steps):
                batch_index, chunk = self.position
                batch = self.task.batch(batch_index)
                spans = chunk_spans(batch.length, config.bptt)
                record = self.train_step(batch.time_slice(*spans[chunk]))
                self.step += 1
                self.position = (batch_index, chunk + 1) if chunk + 1 < len(spans) else (
                    batch_index + 1, 0)
                tokens += record["tokens"]
                elapsed = time.perf_counter() - started
                if isinstance(self.scheduler, BudgetSchedule):  # the rate of the next step
                    self.scheduler.advance(self.step, elapsed)
                if log:
                    log.write({"kind": "train", "step": self.step, "time": round(elapsed, 3),
                               **record})
                bar.total = budget_total(config, self.step, self.step - first_step, elapsed)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens / elapsed:,.0f}",
                                refresh=False)
                if self.on_step is not None:
                    self.on_step(self, record)
                if (not self.group.distributed and config.minutes is not None
                        and elapsed >= config.minutes * 60):  # ranks agree on it in the step
                    self.stop_reason = "time"
                on_cadence = self.step % config.eval_every == 0
                if on_cadence:
                    self._evaluate_and_schedule(log, bar)
                final = self.stop_reason is not None or self.step == config.steps
                if final and not on_cadence and self.stop_reason != "interrupted":
                    # report only: a schedule fed off-cadence evaluations would make a run
                    # extended with --resume differ from one that ran straight through
                    self._evaluate_and_schedule(log, bar, schedule=False)
                if final or self.step % checkpoint_every == 0:
                    if log:  # the records up to the checkpoint reach the disk before it does
                        log.flush(sync=True)
                    self.save()
            if log:  # inside the try: a failing last write is reported like any other
                log.close()
        except KeyboardInterrupt:
            # a second Ctrl-C: stop now, mid-step, without a checkpoint of this half-done state
            self.stop_reason = "interrupted"
            if main:
                bar.write(f"stopped at once; {self._intact()}", file=sys.stderr)
        except DivergenceError:
            if log:  # the curves up to the blow-up are what one needs to diagnose it (rank 0)
                log.close()
                self._plot(metrics)
            raise
        except RunWriteError as error:  # disk full: say what survives, in the same line
            raise RunWriteError(f"{error}; {self._intact()}") from None
        except RankLostError as error:  # another rank died: the same, and how to go on
            raise RankLostError(f"{error}; {self._intact()}") from None
        finally:
            self._restore_sigint(previous_handler)
            bar.close()
            if log:
                log.close(quiet=True)  # already closed unless an exception is on its way
        if metrics is not None and main:
            try:
                plot = self._plot(metrics)
            except RunWriteError as error:
                raise RunWriteError(f"{error}; {self._intact()}") from None
        return TrainResult(
            step=self.step, reason=self.stop_reason or "steps", valid=self.last_valid,
            best_valid=self.best_valid,
            checkpoint=(self.out_dir / "checkpoint.json") if self.out_dir else None,
            metrics=metrics, plot=plot,
        )

    def _plot(self, metrics: Path | None) -> Path | None:
        if self.out_dir is None or metrics is None:
            return None
        from rnnkit.viz.curves import plot_run  # matplotlib only when there is a run directory

        return plot_run(metrics, self.out_dir / "curves.png",
                        title=f"{self.task.name}: {self.out_dir.name}",
                        unit=getattr(self.task, "loss_unit", "nats per token"))

    def _evaluate_and_schedule(self, log: MetricsLog | None, bar: tqdm, schedule: bool = True) -> None:
        valid = self.evaluate()
        self.last_valid = valid
        monitor = self.config.monitor
        if monitor not in valid:
            raise ValueError(f"train.monitor is {monitor!r}, but the {self.task.name} task's "
                             f"validation reports only {', '.join(sorted(valid))}")
        value = valid[monitor]
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and schedule:
            self.scheduler.step(value)
        elif self.scheduler is not None and schedule and not isinstance(self.scheduler,
                                                                         BudgetSchedule):
            self.scheduler.step()  # the budget schedule moves at every step, not here
        best = self.best_valid
        if best is None or (value > best if self.config.monitor_mode == "max" else value < best):
            self.best_valid = value
            self.evals_without_gain = 0
            self.save_best(valid)
        elif schedule:
            self.evals_without_gain += 1
            if self.config.early_stop is not None and self.evals_without_gain >= self.config.early_stop:
                self.stop_reason = "early_stop"
        if log:
            log.write({"kind": "valid", "step": self.step, **valid})
            log.flush()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in valid.items())
        if self.progress and self.group.is_main:
            bar.write(f"step {self.step}: validation {shown}", file=sys.stderr)

    def _install_sigint(self) -> Any:
        """Ctrl-C (SIGINT) and SIGTERM (``kill``, job schedulers) stop at the next step boundary
        with a checkpoint. A second Ctrl-C stops at once (without a checkpoint of the half-done
        step; the last one stays), except during a checkpoint write, which always completes;
        more SIGTERMs change nothing (schedulers and ``kill`` loops send several)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if (self._requested or self.stop_reason) != "interrupted":
                self.request_stop("interrupted")
            elif signum == signal.SIGINT and not self._saving and not self.group.distributed:
                # under torchrun a Ctrl-C reaches each rank twice (from the terminal, then from
                # the launcher, which kills the ranks itself if they take too long): only the
                # agreed stop at a step boundary, never a rank leaving the others mid-step
                raise KeyboardInterrupt

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_sigint(previous: Any) -> None:
        if previous is not None:
            for sig, old in previous.items():
                signal.signal(sig, old)
