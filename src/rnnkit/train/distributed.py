"""Training on several processes with torch.distributed: ranks, batch shards and collectives.

``torchrun`` (or ``rnnkit train --nproc-per-node N``, which starts the same launcher) sets
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; :func:`init_from_env` joins that process
group (gloo on CPU, nccl on CUDA). Everything here is torch.distributed: no process group or
parameter server of our own.

The rule for a global batch of B examples (or streams) over W ranks: rank r gets the contiguous
rows ``shard_span(B, r, W)``; the first ``B % W`` ranks get one row more (as ``torch.tensor_split``
cuts). Every rank must get at least one row. The Trainer weights each rank's mean loss by its
share of the batch's loss terms, so the averaged gradient is the one-process gradient of the
whole batch whatever the split (uneven rows, sequences of different lengths).

A collective that fails because another rank died raises :class:`RankLostError`, one line that
names it, instead of a gloo traceback; a collective never runs on a single process.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

# the wait a collective allows a slow rank (long evaluations, checkpoint writes) before gloo
# gives up; a dead rank is noticed at once (its sockets close), not after this
TIMEOUT = datetime.timedelta(minutes=30)


class RankLostError(RuntimeError):
    """Another rank stopped (crashed, was killed) while this one waited for it."""


@dataclass(frozen=True)
class Group:
    """This process's place in the job: ``rank`` of ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, plots and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Group()


def env_world_size() -> int:
    """The number of processes torchrun started (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def current() -> Group:
    """The group this process has joined (:data:`SINGLE` when none)."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return SINGLE


def init_from_env() -> Group:
    """Joins the process group torchrun describes in the environment (nothing for one process).

    A rendezvous that cannot start (an address in use, an unreachable master) is one ValueError
    naming it, raised before any data is read or any model built."""
    if env_world_size() <= 1 or not dist.is_available():
        return SINGLE
    if dist.is_initialized():
        return current()
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as error:  # DistNetworkError, DistStoreError are these
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise ValueError(f"cannot join the process group at {where}: {_first_line(error)}") from None
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_span(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of ``total`` that ``rank`` owns; the remainder goes to the first ranks."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_batch_size(batch_size: int, group: Group) -> None:
    """Every rank needs at least one example (stream) of every global batch."""
    if group.distributed and batch_size < group.world_size:
        raise ValueError(f"--batch-size {batch_size} cannot be shared by {group.world_size} ranks: "
                         f"each needs at least one example; use a batch of {group.world_size} or "
                         "more (it is the global batch), or fewer processes")


def shard_rows(value: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of dim 1 (the batch dimension of rnnkit's time-major tensors) of a
    tensor or a (named) tuple of them; None stays None."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[:, start:stop] if value.numel() else value  # empty: an absent value
    parts = [shard_rows(v, start, stop) for v in value]
    return type(value)(*parts) if hasattr(value, "_fields") else tuple(parts)


def batch_rows(value: Any) -> int | None:
    """The batch size (dim 1) of the first tensor in ``value``."""
    if isinstance(value, Tensor):
        return int(value.shape[1]) if value.dim() >= 2 else None
    for part in value if isinstance(value, tuple) else ():
        rows = batch_rows(part)
        if rows is not None:
            return rows
    return None


def gather_rows(values: list[Tensor], group: Group) -> list[Tensor]:
    """Each tensor concatenated over the ranks on dim 1, in rank order (the global layout that
    :func:`shard_rows` cuts); every rank gets the result."""
    if not group.distributed:
        return values
    pieces = all_gather_object([v.detach().cpu() for v in values], group)
    return [torch.cat([rank_values[i] for rank_values in pieces], dim=1) for i in range(len(values))]


# --- collectives: one place that turns a lost peer into one clear error ----------------------

def _first_line(error: BaseException) -> str:
    """The gist of a (gloo) error: its first line, without the source location and advice."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text.splitlines()[0])
    return line.split(". This is typically")[0]


def _collective(what: str, run: Callable[[], T]) -> T:
    try:
        return run()
    except (RuntimeError, ValueError, ConnectionError, pickle.UnpicklingError) as error:
        raise RankLostError(
            f"another rank stopped while this one waited for it ({what}: {_first_line(error)}); "
            "see that rank's own message above") from None


def all_reduce_sum(values: list[float], group: Group) -> list[float]:
    """The sums over the ranks of ``values`` (float64, so token counts stay exact)."""
    if not group.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    _collective("sum of step totals", lambda: dist.all_reduce(tensor))
    return tensor.tolist()


def all_gather_object(value: T, group: Group) -> list[T]:
    if not group.distributed:
        return [value]
    out: list[Any] = [None] * group.world_size
    _collective("gather", lambda: dist.all_gather_object(out, value))
    return out


def broadcast_object(value: T, group: Group) -> T:
    """Rank 0's ``value`` on every rank."""
    if not group.distributed:
        return value
    box = [value]
    _collective("broadcast from rank 0", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def barrier(group: Group) -> None:
    if group.distributed:
        _collective("barrier", lambda: dist.barrier())


# --- the launcher ------------------------------------------------------------------------------

def strip_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE`` (the children must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """``python -m rnnkit ARGV`` on ``nproc`` local processes, started by torch's elastic
    launcher exactly as ``torchrun --standalone --nproc-per-node NPROC -m rnnkit ARGV`` does
    (a free port is picked: no clash with another job). Returns the exit status.

    Each rank prints its own one-line error; torchrun's failure report, which would repeat it
    as a traceback, is left out."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc}")
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "rnnkit", *argv])
    try:
        run(args)
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        return next((code for code in codes if code > 0), 1)
    except SignalException as error:  # SIGTERM/SIGINT: the ranks have stopped (and saved)
        return 128 + int(error.sigval)
    return 0
