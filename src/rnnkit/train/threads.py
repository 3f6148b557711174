"""How many CPU threads a training run uses, and the line that says why.

The measuring and shedding is the engine's thread governor (:mod:`rnnkit.engine.threads`): every
layer call follows the cores other processes leave free. The command line only sets the request
the governor never exceeds — ``--threads N``, else ``OMP_NUM_THREADS`` (torch honours it), else
torch's default of one thread per core — takes the governor's first full sample before the run
starts, and reports the choice and, during the run, its changes. One measurement of the load in
the whole library, so the start-up line and the kernels never disagree.

Why it matters: torch's default oversubscribes a machine where other processes keep cores busy,
and a recurrent layer's threads meet at a barrier every step; a charlm step measured 5× slower
with 2 threads than with 1 while another process kept one of 2 cores busy (issue 17).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from rnnkit.engine import threads as engine_threads
from rnnkit.engine.threads import ThreadGovernor


@dataclass
class ThreadChoice:
    """The thread count of a run, why, and whether it follows the load during the run."""

    threads: int
    reason: str
    automatic: bool  # chosen from the load (the line says how to override it)
    requested: int = 1
    source: str = "torch's default"  # where the request came from, as the lines name it
    governor: ThreadGovernor = field(default_factory=lambda: engine_threads.GOVERNOR, repr=False)

    def line(self) -> str:
        """The start-up line: the choice, why, and how to override it."""
        how = "; --threads N overrides" if self.automatic else ""
        plural = "s" if self.threads != 1 else ""
        return f"threads: {self.threads} thread{plural} ({self.reason}){how}"

    def recheck(self) -> str | None:
        """A line when the governor has changed the count since the last report, else None
        (whatever set the request: ``--threads N`` is a ceiling the governor keeps under)."""
        threads = torch.get_num_threads()
        if threads == self.threads or self.governor.policy == "fixed":
            return None
        self.threads = threads
        self.reason = load_reason(self.governor, self.source, self.requested, threads)
        return f"threads: now {threads} ({self.reason})"


def load_reason(governor: ThreadGovernor, source: str, requested: int, threads: int) -> str:
    busy = governor.busy_cores()
    if busy is None:
        return f"{source}; no /proc to measure the load"
    if threads == requested:
        return f"{source}: other processes keep {busy} of {governor.cores} cores busy"
    return (f"other processes keep {busy} of {governor.cores} cores busy; {source} "
            f"{requested} would oversubscribe them")


def choose_threads(requested: int | None,
                   governor: ThreadGovernor | None = None) -> ThreadChoice:
    """The run's thread count, applied to torch: ``requested`` (``--threads``) if given, else
    ``OMP_NUM_THREADS`` if set, as they are; else torch's default less the cores other
    processes keep busy now (the governor's first full sample), followed during the run."""
    governor = governor or engine_threads.GOVERNOR
    if requested is not None:
        torch.set_num_threads(requested)
        return ThreadChoice(requested, "--threads", automatic=False, requested=requested,
                            source="--threads", governor=governor)
    if os.environ.get("OMP_NUM_THREADS"):
        count = torch.get_num_threads()
        return ThreadChoice(count, "OMP_NUM_THREADS", automatic=False, requested=count,
                            source="OMP_NUM_THREADS", governor=governor)
    default = torch.get_num_threads()
    if default == 1:  # nothing to take away: no need to measure
        return ThreadChoice(1, "torch's default here", automatic=False, governor=governor)
    if governor.policy == "fixed":
        return ThreadChoice(default, f"torch's default; {engine_threads.POLICY_ENV}=fixed",
                            automatic=False, requested=default, governor=governor)
    threads = governor.settle()
    source = "torch's default"
    return ThreadChoice(threads, load_reason(governor, source, default, threads),
                        automatic=True, requested=default, source=source, governor=governor)
