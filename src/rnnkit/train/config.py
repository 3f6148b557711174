"""Training options shared by every task; read from flags, YAML/TOML files and checkpoints.

Types, ranges and help are declared on the fields; :mod:`rnnkit.options` checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

from rnnkit.options import OptionError, Options, option

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "plateau", "step", "budget")
MONITOR_MODES = ("min", "max")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig(Options):
    # none: no step cap, the run ends on train.minutes or early stopping (the command line
    # lifts a task's default cap this way when the user gives --minutes without --steps)
    steps: int | None = option(1000, "optimizer updates (one per BPTT chunk); none: no cap "
                                     "(needs minutes or early_stop)", ge=1, on_resume=True)
    minutes: float | None = option(None, "wall-clock budget; stops cleanly at a step boundary",
                                   gt=0, on_resume=True)
    batch_size: int = option(32, "sequences (or parallel streams) per batch", ge=1)
    bptt: int | None = option(None, "truncated BPTT chunk length k; none (or 'full'): full BPTT "
                                    "over each batch", ge=1)
    optimizer: str = option("adam", "the optimizer", choices=OPTIMIZERS)
    lr: float = option(2e-3, "learning rate", gt=0, on_resume=True)
    momentum: float = option(0.0, "SGD momentum", ge=0, lt=1)
    weight_decay: float = option(0.0, "L2 weight decay", ge=0)
    clip_norm: float | None = option(5.0, "bound on the global gradient L2 norm", gt=0,
                                     on_resume=True)
    clip_value: float | None = option(None, "bound ±c on each gradient element, applied before "
                                            "the norm bound", gt=0, on_resume=True)
    schedule: str = option("plateau", "learning-rate schedule: ReduceLROnPlateau on the monitored "
                                      "metric, 'step' decay, 'budget' (decay over the steps or "
                                      "minutes budget), or none", choices=SCHEDULES)
    plateau_factor: float = option(0.5, "plateau: rate multiplier on a plateau", gt=0, lt=1)
    plateau_patience: int = option(1, "plateau: evaluations without gain before cutting the rate",
                                   ge=0)
    # "step": the rate is multiplied by decay_factor at every evaluation after the first
    # decay_after ones, whatever the validation loss does (Zaremba et al. 2014's schedule)
    decay_factor: float = option(0.5, "step: rate multiplier per evaluation after decay_after",
                                 gt=0, le=1)
    decay_after: int = option(4, "step: evaluations at the full rate", ge=0)
    # "budget": Zaremba et al.'s shape (hold, then geometric decay) compressed into whatever
    # budget binds: the progress p is the larger of step/steps and the share of train.minutes
    # used, and the rate is lr · budget_final^((p − budget_hold) / (1 − budget_hold)) after the
    # hold, updated at every step
    budget_hold: float = option(0.2, "budget: share of the budget (steps or minutes) at the full "
                                     "rate", ge=0, lt=1)
    budget_final: float = option(0.01, "budget: rate multiplier reached at the end of the "
                                       "budget (geometric decay after the hold)", gt=0, le=1)
    early_stop: int | None = option(None, "evaluations without improvement before stopping",
                                    ge=1, on_resume=True)
    # the validation metric that picks the best weights and drives early stopping and the
    # plateau schedule; "min": lower is better (a loss), "max": higher is (accuracy, F1, BLEU)
    monitor: str = option("loss", "validation metric that picks the best weights")
    monitor_mode: str = option("min", "min: lower is better (a loss); max: higher is",
                               choices=MONITOR_MODES)
    eval_every: int = option(100, "steps between validations", ge=1, on_resume=True)
    checkpoint_every: int | None = option(None, "steps between checkpoints (none: at each "
                                                "validation)", ge=1, on_resume=True)
    seed: int = option(1234, "random seed (runs are deterministic on the CPU)", ge=0, le=2**63 - 1)
    # bf16: the training and validation forward passes run under torch.autocast("cpu",
    # bfloat16): rnnkit's recurrent layers in mixed precision (rnnkit.engine.precision), torch's
    # linear layers in bf16; the weights, their gradients and the optimizer stay float32, so a
    # checkpoint is the same either way and a run may switch on resume
    precision: str = option("fp32", "arithmetic of training and validation: fp32, or bf16 "
                                    "mixed precision (autocast; needs a CPU with bfloat16 "
                                    "instructions)", choices=PRECISIONS, on_resume=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps is None and self.minutes is None and self.early_stop is None:
            raise OptionError("train.steps", "is none (no step cap), so train.minutes or "
                                             "train.early_stop must end the run; give one")
        if self.schedule == "budget" and self.steps is None and self.minutes is None:
            raise OptionError("train.schedule", "is 'budget', which decays the rate over "
                                                "train.steps or train.minutes; give one")
