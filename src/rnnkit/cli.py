"""The ``rnnkit`` command: ``train``, ``predict``, ``evaluate``, ``sample``, ``transcribe``,
``tasks``, ``hello``.

Options come from the task's defaults, then a YAML/TOML ``--config`` file, then flags and
``--set`` (later wins); the flags, their checks and ``rnnkit train TASK --help`` are generated
from the task's config dataclasses (:mod:`rnnkit.options`). Every run writes its resolved
``config.yaml`` beside its checkpoint so ``--config`` repeats it. A bad option or input is one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rnnkit.explore.command import add_command as add_explore_command
from rnnkit.explore.command import run as run_explore
from rnnkit.options import OptionError, Options, TaskSchema, option, read_config_file
from rnnkit.options.command import (
    Parser,
    UsageError,
    add_task_flags,
    apply_flags,
    flag_names,
    flag_type,
)
from rnnkit.tasks import TASKS

THREADS_HELP = ("torch CPU threads (default for train: the cores other processes leave free, "
                "re-checked during the run; otherwise torch's choice)")
RECHECK_SECONDS = 30.0  # how often a training run reports the thread governor's changes
NPROC_HELP = ("train on N processes of this machine (torch.distributed; --batch-size stays the "
              "global batch): starts torchrun for you")


@dataclass
class CommandOptions(Options):
    """The options of ``train`` and ``hello`` other than a task's own (checked like every other
    option); those of the commands that use a trained run are :class:`rnnkit.commands.RunOptions`."""

    threads: int | None = option(None, THREADS_HELP, ge=1)
    seed: int | None = option(None, "seed: same seed, same text", ge=0, le=2**63 - 1)
    steps: int = option(100, "training steps", ge=1)
    nproc_per_node: int = option(1, NPROC_HELP, ge=1)


def _typed(cls: type, name: str, flag: str) -> Any:
    """argparse ``type=`` checking a flag by the rules of field ``name`` of ``cls``."""
    return flag_type(cls, name, flag)


def _task_named(argv: Sequence[str]) -> str | None:
    """The task of ``rnnkit train TASK …``: its flags are generated before parsing."""
    if "train" not in argv:
        return None
    return next((a for a in argv[list(argv).index("train") + 1:] if a in TASKS), None)


def _build_parser(task: str | None = None) -> argparse.ArgumentParser:
    from rnnkit.tasks import TASK_DATA, task_schema
    from rnnkit.tasks.layouts import data_help

    parser = Parser(prog="rnnkit", description="Recurrent networks: train, predict, evaluate, sample.",
                    allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a model on a task (charlm, speech, digits, ...)",
        description=(f"Train the {task} task: {TASKS[task]}.\nData: {TASK_DATA[task]}."
                     if task else "Train a model on a task:\n" + "\n".join(
                         f"  {name:10s} {text}" for name, text in TASKS.items()) +
                     "\n`rnnkit train TASK --help` lists every option of a task with its type "
                     "and default; `rnnkit tasks` lists the tasks' data formats.") +
        "\nWith no --data, charlm trains on the Python standard library's own source (read "
        "at run time); the other tasks read the default data location, $RNNKIT_DATA or else "
        "../shared/data (relative to the current directory). Options come from the "
        "task's defaults, then --config FILE, then flags and --set (later wins).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    train.add_argument("task", choices=list(TASKS), help="what to train")
    train.add_argument("--data", nargs="+", metavar="PATH", default=None,
                       help=(data_help(task) if task else "the task's data: a folder in its "
                             "standard layout, or SPLIT=PATH per split (rnnkit tasks lists "
                             "them)") + "; relative to the current directory")
    train.add_argument("--set", action="append", metavar="SECTION.OPTION=VALUE", default=None,
                       help="any option, e.g. --set data.split=speaker (repeatable)")
    train.add_argument("--config", metavar="FILE", default=None,
                       help="YAML or TOML file of options (sections data, model, train, ...); "
                            "the presets beyond a task's defaults are such files in examples/, "
                            "e.g. examples/ptb-medium.yaml for wordlm")
    train.add_argument("--out", metavar="DIR", default=None,
                       help="run directory (default runs/<task>-<timestamp>)")
    train.add_argument("--resume", action="store_true", default=False,
                       help="continue the run in --out exactly where its checkpoint left off; "
                            "steps, minutes, lr, clipping and the evaluation and checkpoint "
                            "cadence may change, the rest may not")
    train.add_argument("--no-progress", action="store_true", default=False,
                       help="no progress bar")
    train.add_argument("--threads", type=_typed(CommandOptions, "threads", "--threads"),
                       default=None, help=THREADS_HELP)
    train.add_argument("--nproc-per-node", metavar="N", default=1,
                       type=_typed(CommandOptions, "nproc_per_node", "--nproc-per-node"),
                       help=NPROC_HELP)
    if task is not None:
        # argparse reports unknown flags from the top-level parser: both know the task
        parser.task = train.task = task
        parser.command = train.command = "rnnkit train"
        add_task_flags(train, task_schema(task))

    # the subcommands that use a trained run live in rnnkit.commands, one module each; their
    # flags are checked by the option layer too (rnnkit.commands.RunOptions)
    from rnnkit.commands import evaluate, faces, predict

    predict.add_parser(commands, THREADS_HELP)
    evaluate.add_parser(commands, THREADS_HELP)
    faces.add_sample_parser(commands, THREADS_HELP)
    faces.add_transcribe_parser(commands, THREADS_HELP)

    commands.add_parser("build", help="compile rnnkit's C++ kernels now (once per machine)",
                        description="Build every C++ kernel into torch's extension cache, so that "
                                    "no first run pauses to compile them.")
    commands.add_parser("tasks", help="the tasks and the data each one reads",
                        description="List the tasks, their data formats and default data.")

    from rnnkit.export import cli as export_cli

    export_cli.add_parser(commands)

    hello = commands.add_parser("hello", help="the classic h-e-l-l-o RNN demo, in seconds",
                                description="Train a 4-symbol RNN to continue 'hell' as 'ello'.")
    hello.add_argument("--steps", type=_typed(CommandOptions, "steps", "--steps"), default=100,
                       help="training steps")
    hello.add_argument("--seed", type=_typed(CommandOptions, "seed", "--seed"), default=0,
                       help="random seed")
    add_explore_command(commands)
    return parser


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rnnkit.tasks import task_module, task_schema
    from rnnkit.tasks.layouts import data_options, mixed_sources
    from rnnkit.train import distributed
    from rnnkit.train.atomic import write_text
    from rnnkit.train.checkpoint import POINTER, load_checkpoint
    from rnnkit.train.config import TrainConfig
    from rnnkit.train.rng import seed_everything
    from rnnkit.train.threads import choose_threads
    from rnnkit.train.trainer import Trainer, stop_words

    group = distributed.init_from_env()
    if not group.is_main:  # rank 0 alone prints; every rank reports its own errors (stderr)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    name = args.task
    module = task_module(name)
    schema = task_schema(name)
    config = schema.defaults
    checkpoint = None
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise OptionError("--out", f"names a file ({out}); a run directory must be a directory")
    # torchrun --max-restarts: ranks restarted after a failure continue from the run's checkpoint
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
    if restarted and out is not None and (out / POINTER).exists():
        args.resume = True
    if args.resume:
        if out is None:
            raise OptionError("--resume", "needs --out DIR, the run to continue")
        checkpoint = load_checkpoint(out)  # refuses a bad checkpoint before anything is written
        saved = out / "config.yaml"
        if saved.is_file():
            config = schema.merge(config, read_config_file(saved), str(saved))
        else:  # nothing to compare the options with: the checkpoint's task description decides
            saved = None
    else:
        out = out or Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")
        out = distributed.broadcast_object(out, group)  # one timestamp for every rank
        if (out / POINTER).exists():
            raise OptionError("--out", f"{out} already holds a run; pass --resume to continue it "
                                       "or choose another --out")
    run_config = config
    from_file: dict[str, Any] = {}
    if args.config:
        from_file = read_config_file(args.config)
        config = schema.merge(config, from_file, args.config)
    config = apply_flags(schema, config, args, flag_names(schema))
    if getattr(args, "data", None):  # after the flags: which layout applies may depend on them
        for dotted, value in data_options(name, args.data, config).items():
            config = schema.set(config, dotted, value, "--data")
    mixed = mixed_sources(name, config)
    if mixed:
        print(mixed, file=sys.stderr)
    given = _given_options(args, from_file)
    if "train.minutes" in given and "train.steps" not in given:
        # a time budget the user gives is the budget: the task's default step cap (sized for
        # a run of a few minutes) would otherwise end a 15-minute run after 3
        config = schema.set(config, "train.steps", None, "--minutes")
    if checkpoint is not None and saved is not None:
        _refuse_fixed_changes(schema, run_config, config)

    train_config = TrainConfig.from_dict(config["train"], "train")
    threads = choose_threads(args.threads)
    seed_everything(train_config.seed)
    task, model, source = module.build(config)
    trainer = Trainer(model, task, train_config, out, progress=not args.no_progress)
    if checkpoint is not None:
        if _json_form(checkpoint.meta.get("task")) != _json_form(task.describe()):
            raise ValueError(f"{checkpoint.path} was trained with other data or another model "
                             "than given now; resume with the run's own config")
        trainer.load(checkpoint)
        # the rate the run was trained with, as its checkpoint records it
        old_lr = float((checkpoint.meta.get("train_config") or {}).get("lr", train_config.lr))
        new_lr = train_config.lr
        if new_lr != old_lr:
            trainer.rescale_lr(new_lr / old_lr)
            print(f"learning rate: {old_lr:g} → {new_lr:g} (now "
                  f"{trainer.optimizer.param_groups[0]['lr']:g} with the schedule's cuts so far)")

    recorded = False
    next_check = time.monotonic() + RECHECK_SECONDS

    def on_step(trainer: Trainer, record: dict[str, Any]) -> None:
        nonlocal recorded, next_check
        # config.yaml is written once the run has really started: a run that fails to start
        # (a bad --resume option, missing data) leaves the previous one as it was; by rank 0
        # alone, which has made the run directory by then (every rank passes the first step's
        # all-reduce only after reading the old config.yaml)
        if not recorded:
            recorded = True
            if group.is_main:
                write_text(out / "config.yaml", yaml.safe_dump(
                    {"task": name, **config}, sort_keys=False, allow_unicode=True))
        # other work starts and stops during a long run; the thread governor follows it at
        # every layer call, and the log says when that changed the count
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + RECHECK_SECONDS
            changed = threads.recheck()
            if changed:
                tqdm.write(changed, file=sys.stderr)

    trainer.on_step = on_step

    params = sum(p.numel() for p in model.parameters())
    print(threads.line())
    print(f"data: {source}")
    if hasattr(module, "describe_data"):
        print(f"      {module.describe_data(task)}")
    print(f"model: {type(model).__name__} with {params:,} parameters; run directory {out}")
    print(f"budget: {_budget_words(train_config)}")
    if checkpoint is not None:
        cap = f" of {train_config.steps}" if train_config.steps is not None else ""
        print(f"resuming from step {trainer.step}{cap}")
    with _repeated_sigterm_ignored(trainer):
        result = trainer.fit()

        print(f"stopped at step {result.step}: {stop_words(result.reason, train_config)}")
        kept_step, kept = _kept_scores(out, result)
        if kept:
            shown = (module.describe_metrics(kept) if hasattr(module, "describe_metrics")
                     else ", ".join(f"{key} {value:.4f}" for key, value in kept.items()))
            which = ("best validation " + train_config.monitor if kept_step is not None
                     else "the last weights")
            print(f"kept weights: step {kept_step if kept_step is not None else result.step} "
                  f"({which}), validation {shown}")
        if hasattr(module, "report") and group.is_main:
            module.report(task, model, config, out)
        print(f"checkpoint: {result.checkpoint}")
        print(f"metrics:    {result.metrics}")
        print(f"plot:       {result.plot}")
        print(f"config:     {out / 'config.yaml'}")
        if result.reason == "interrupted":
            ranks = f" --nproc-per-node {group.world_size}" if group.distributed else ""
            print(f"interrupted; continue with: rnnkit train {name} --out {out} --resume{ranks}")
    return 0


def _given_options(args: argparse.Namespace, from_file: dict[str, Any]) -> set[str]:
    """The dotted options this command line sets: by flag, ``--set`` or ``--config`` file."""
    from rnnkit.options.command import DEST

    given = {dest[len(DEST):] for dest in vars(args) if dest.startswith(DEST)}
    given |= {a.partition("=")[0].strip() for a in getattr(args, "set", None) or []}
    given |= {f"{section}.{key}" for section, values in from_file.items()
              if isinstance(values, dict) for key in values}
    return given


def _budget_words(config: Any) -> str:
    """The run's limits in words, for the start-up lines."""
    parts = []
    if config.steps is not None:
        parts.append(f"{config.steps:,} steps")
    if config.minutes is not None:
        parts.append(f"{config.minutes:g} minutes")
    if config.early_stop is not None:
        parts.append(f"early stopping after {config.early_stop} evaluations without gain")
    ends = "whichever comes first" if len(parts) > 1 else "(--steps, --minutes)"
    return f"{' or '.join(parts)}, {ends}" if len(parts) > 1 else f"{parts[0]} {ends}"


def _kept_scores(out: Path, result: Any) -> tuple[int | None, dict[str, float]]:
    """The step and validation scores of the weights the run keeps (``best.json``, as
    ``rnnkit.load`` reads them), or (None, the last validation) when it kept none."""
    from rnnkit.train.checkpoint import BEST

    try:
        meta = json.loads((out / f"{BEST}.json").read_text(encoding="utf-8"))
        return int(meta["step"]), {k: float(v) for k, v in meta["valid"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, result.valid


@contextlib.contextmanager
def _repeated_sigterm_ignored(trainer: Any) -> Iterator[None]:
    """SIGTERM around ``trainer.fit()`` and the end-of-run report.

    While it trains, the Trainer's own handler stops the run at a step boundary and ignores
    repeats; when ``fit()`` returns it puts back the handler it found, which is this one. A
    scheduler or ``kill`` loop sends several SIGTERMs: one that lands after a run already
    stopped by the first (``fit()`` can return within milliseconds of it) changes nothing
    either; any other stops the command (exit 130, as Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if trainer.stop_reason != "interrupted":
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _refuse_fixed_changes(schema: TaskSchema, before: dict[str, Any],
                          after: dict[str, Any]) -> None:
    """On --resume only the options declared ``on_resume`` (budget, rate, cadence) may change."""
    for dotted in schema.differences(before, after):
        if not schema.leaves[dotted].spec.rule.on_resume:
            changeable = ", ".join(n for n, leaf in schema.leaves.items()
                                   if leaf.spec.rule.on_resume)
            raise OptionError(dotted, f"cannot change when resuming (the run has "
                                      f"{schema.value(before, dotted)!r}, given "
                                      f"{schema.value(after, dotted)!r}); start a new run with "
                                      f"another --out, or change only {changeable}")


def _json_form(value: Any) -> str:
    """A canonical text of JSON-able data (tuples and lists compare equal)."""
    return json.dumps(value, sort_keys=True, default=str)


def _hello(args: argparse.Namespace) -> int:
    from rnnkit.tasks.hello import run_hello

    return 0 if run_hello(steps=args.steps, seed=args.seed) == "ello" else 1


def _build(args: argparse.Namespace) -> int:
    from rnnkit.native import build_all

    failed = 0
    for name, error in build_all():
        print(f"{name}: {'ready' if error is None else error}")
        failed += error is not None
    if failed:
        print("rnnkit runs without them on its slower pure-torch paths", file=sys.stderr)
    return 1 if failed else 0


def _tasks(args: argparse.Namespace) -> int:
    from rnnkit.tasks import TASK_DATA
    from rnnkit.tasks.common import DATA_ENV, shared_root
    from rnnkit.tasks.layouts import data_help

    for name, summary in TASKS.items():
        print(f"{name:10s} {summary}")
        print(f"{'':10s} data: {TASK_DATA[name]}")
        print(f"{'':10s} --data: {data_help(name)}")
    print(f"Default data location: {shared_root()} (${DATA_ENV}, else ../shared/data relative to "
          "the current directory); --data paths are relative to the current directory.")
    print("rnnkit train TASK --help lists a task's options and defaults.")
    return 0


def _rank_tag() -> str:
    """" (rank N)" in a job of several processes, so a message says which one wrote it."""
    rank = os.environ.get("RANK")
    return f" (rank {rank})" if rank not in (None, "0") else ""


def _first_on_machine() -> bool:
    """Whether this process reports an error that every rank of a job meets alike (the ranks
    run the same code on the same options): one line per machine, not one per rank."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        guess = _task_named(argv)
        parser = _build_parser(guess)
        args, extra = parser.parse_known_args(argv)
        if args.command == "train" and args.task != guess:  # e.g. an --out DIR named like a task
            parser = _build_parser(args.task)
            args, extra = parser.parse_known_args(argv)
        if extra and args.command == "predict" and not any(e.startswith("-") for e in extra):
            args.inputs += extra  # inputs after an option: `rnnkit predict RUN --beam 4 "text"`
        elif extra:
            parser.command = parser.command or f"rnnkit {args.command}"
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as error:
        if _first_on_machine():
            print(error, file=sys.stderr)
        return 2
    from rnnkit.data.audio import AudioError
    from rnnkit.data.vocab import UnknownSymbolError
    from rnnkit.train.checkpoint import CheckpointError
    from rnnkit.train.distributed import RankLostError, shutdown
    from rnnkit.train.trainer import DivergenceError

    if getattr(args, "threads", None) and args.command != "train":  # train: choose_threads
        import torch

        torch.set_num_threads(args.threads)
    from rnnkit.commands import evaluate, faces, predict
    from rnnkit.export import cli as export_cli

    nproc = getattr(args, "nproc_per_node", 1)
    if nproc != 1 and "WORLD_SIZE" not in os.environ:
        from rnnkit.train.distributed import launch, strip_option

        try:
            return launch(nproc, strip_option(argv, "--nproc-per-node"))
        except ValueError as error:
            print(f"rnnkit {args.command}: error: {error}", file=sys.stderr)
            return 2
    handlers = {"train": _train, "predict": predict.run, "evaluate": evaluate.run,
                "sample": faces.run_sample, "transcribe": faces.run_transcribe, "tasks": _tasks,
                "build": _build, "hello": _hello, "export": export_cli.run, "explore": run_explore}
    try:
        return handlers[args.command](args)
    except RankLostError as error:
        print(f"rnnkit {args.command}: error{_rank_tag()}: {error}", file=sys.stderr)
        return 1
    except (CheckpointError, DivergenceError, UnknownSymbolError, ValueError,
            OSError, AudioError) as error:  # OSError: a missing file, a directory given as one, ...
        if _first_on_machine():
            print(f"rnnkit {args.command}: error{_rank_tag()}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside training, or a second one while the first was stopping the run at a
        # step boundary: stop at once; checkpoints are written atomically, so the last is whole
        # (only train writes checkpoints: the other commands just say they were interrupted)
        note = "; the last checkpoint written is intact" if args.command == "train" else ""
        print(f"rnnkit {args.command}: interrupted{note}", file=sys.stderr)
        return 130
    finally:
        shutdown()  # leave a torchrun job's process group (nothing for one process)


if __name__ == "__main__":
    sys.exit(main())
