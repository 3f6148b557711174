"""The ``rnnkit`` command: ``train``, ``sample``, ``evaluate`` and ``hello``.

Options come from defaults, then a YAML/TOML ``--config`` file, then flags (later wins); every
run writes its resolved ``config.yaml`` beside its checkpoint so ``--config`` repeats it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rnnkit.tasks import TASKS

# flag → (section, option, type); types other than bool read "none"/"full" as null
_NULLABLE = "nullable"
TRAIN_FLAGS: list[tuple[str, str, str, Any, str]] = [
    ("--cell", "model", "cell", str, "recurrent cell: lstm, gru or rnn"),
    ("--layers", "model", "layers", int, "stacked recurrent layers"),
    ("--hidden", "model", "hidden", int, "hidden units per layer"),
    ("--embedding", "model", "embedding", int, "embedding size; 0 for one-hot inputs"),
    ("--dropout", "model", "dropout", float, "dropout on embeddings, between layers and on outputs"),
    ("--peephole", "model", "peephole", bool, "LSTM with peephole connections"),
    ("--coupled", "model", "coupled", bool, "LSTM with coupled input-forget gates (CIFG)"),
    ("--reset", "model", "reset", str, "GRU reset gate 'after' (torch/cuDNN) or 'before' (Cho 2014)"),
    ("--nonlinearity", "model", "nonlinearity", str, "Elman RNN nonlinearity: tanh, relu, sigmoid"),
    ("--byte-level", "data", "byte_level", bool, "model UTF-8 bytes instead of code points"),
    ("--seq-len", "data", "seq_len", int, "time steps per training batch"),
    ("--valid-fraction", "data", "valid_fraction", float, "last fraction of the text to validate on"),
    ("--valid-chars", "data", "valid_chars", _NULLABLE + ":int", "cap on validation symbols ('none')"),
    ("--steps", "train", "steps", int, "optimizer updates"),
    ("--minutes", "train", "minutes", _NULLABLE + ":float", "wall-clock budget in minutes"),
    ("--batch-size", "train", "batch_size", int, "parallel streams per batch"),
    ("--bptt", "train", "bptt", _NULLABLE + ":int",
     "truncated BPTT chunk length k, or 'full' for full BPTT over each batch"),
    ("--optimizer", "train", "optimizer", str, "adam or sgd"),
    ("--lr", "train", "lr", float, "learning rate"),
    ("--momentum", "train", "momentum", float, "SGD momentum"),
    ("--weight-decay", "train", "weight_decay", float, "L2 weight decay"),
    ("--clip-norm", "train", "clip_norm", _NULLABLE + ":float", "bound on the global gradient norm ('none')"),
    ("--clip-value", "train", "clip_value", _NULLABLE + ":float", "bound ±c on each gradient element"),
    ("--schedule", "train", "schedule", str, "'plateau', 'step' (decay after N evaluations) or 'none'"),
    ("--early-stop", "train", "early_stop", _NULLABLE + ":int", "evaluations without gain before stopping"),
    ("--eval-every", "train", "eval_every", int, "steps between validations"),
    ("--checkpoint-every", "train", "checkpoint_every", _NULLABLE + ":int", "steps between checkpoints"),
    ("--seed", "train", "seed", int, "random seed (runs are deterministic on CPU)"),
    ("--prime", "sample", "prime", str, "text the end-of-run samples start from"),
    ("--sample-length", "sample", "length", int, "symbols per end-of-run sample"),
    ("--temperature", "sample", "temperature", float, "end-of-run sampling temperature"),
    ("--top-k", "sample", "top_k", _NULLABLE + ":int", "sample among the k likeliest symbols"),
]


THREADS_HELP = "torch CPU threads (default: torch's choice; 1 is faster on a busy machine)"


def _nullable(kind: str) -> Any:
    convert = {"int": int, "float": float}[kind]

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "full", "off") else convert(text)

    parse.__name__ = kind
    return parse


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ValueError("TOML configs need Python 3.11 or newer; use YAML") from None
        data = tomllib.loads(text)
    else:
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {file} must hold a mapping of sections")
    return data


def _flag_overrides(args: argparse.Namespace, task: str, defaults: dict[str, Any]
                    ) -> dict[str, Any]:
    """The options given as flags, placed where this task keeps them."""
    overrides: dict[str, Any] = {}
    for flag, section, key, _, _ in TRAIN_FLAGS:
        dest = flag[2:].replace("-", "_")
        if not hasattr(args, dest):  # argparse.SUPPRESS: only flags actually given
            continue
        target = defaults.get(section)
        path = [section, key]
        if isinstance(target, dict) and key not in target and isinstance(
                target.get("recurrent"), dict) and key in target["recurrent"]:
            path = [section, "recurrent", key]
        elif not isinstance(target, dict) or key not in target:
            raise ValueError(f"{flag} is not an option of the {task} task")
        _set_path(overrides, path, getattr(args, dest))
    if getattr(args, "data", None):
        from rnnkit.tasks import DATA_OPTIONS

        if task not in DATA_OPTIONS:
            raise ValueError(f"--data is not an option of the {task} task; use --set data.…=")
        option, several = DATA_OPTIONS[task]
        paths = [str(p) for p in args.data]
        if not several and len(paths) > 1:
            raise ValueError(f"the {task} task takes one --data path, got {len(paths)}")
        _set_path(overrides, ["data", option], paths if several else paths[0])
    for assignment in getattr(args, "set", None) or []:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects SECTION.OPTION=VALUE, got {assignment!r}")
        _set_path(overrides, key.split("."), yaml.safe_load(text))
    return overrides


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnkit", description="Recurrent networks: train, sample, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a model on a task (charlm, speech, digits, ...)",
        description="Train a model on a task:\n" + "\n".join(
            f"  {name:10s} {text}" for name, text in TASKS.items()) +
        "\nWith no --data, charlm trains on the Python standard library's own source (read "
        "at run time); the other tasks read ../shared/data by default.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    train.add_argument("task", choices=list(TASKS), help="what to train")
    train.add_argument("--data", nargs="+", metavar="PATH", default=None,
                       help="charlm: UTF-8 text file(s) (default: the Python standard library); "
                            "speech: a folder of {digit}_{speaker}_{take}.wav; music: a .mat "
                            "file; tagging: an ATIS folder or CoNLL file; translate: a TSV file")
    train.add_argument("--set", action="append", metavar="SECTION.OPTION=VALUE", default=None,
                       help="any option, e.g. --set data.split=speaker (YAML value; repeatable)")
    train.add_argument("--config", metavar="FILE", default=None,
                       help="YAML or TOML file of options (sections data, model, train, ...)")
    train.add_argument("--out", metavar="DIR", default=None,
                       help="run directory (default runs/<task>-<timestamp>)")
    train.add_argument("--resume", action="store_true", default=False,
                       help="continue the run in --out exactly where its checkpoint left off")
    train.add_argument("--no-progress", action="store_true", default=False,
                       help="no progress bar")
    train.add_argument("--threads", type=int, default=None,
                       help=THREADS_HELP)
    train.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                       help="train on N processes of this machine (torch.distributed; "
                            "--batch-size stays the global batch): starts torchrun for you")
    for flag, _, _, kind, text in TRAIN_FLAGS:
        if kind is bool:
            train.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(kind, str):
            train.add_argument(flag, type=_nullable(kind.split(":")[1]), help=text)
        else:
            train.add_argument(flag, type=kind, help=text)

    sample = commands.add_parser("sample", help="generate text from a checkpoint",
                                 description="Generate text from a trained charlm checkpoint.")
    sample.add_argument("checkpoint", help="run directory or its checkpoint.json")
    sample.add_argument("--prime", default="", help="text to start from")
    sample.add_argument("--length", type=int, default=400, help="symbols to generate")
    sample.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 picks the likeliest symbol")
    sample.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    sample.add_argument("--seed", type=int, default=None, help="seed: same seed, same text")
    sample.add_argument("--threads", type=int, default=None, help=THREADS_HELP)

    evaluate = commands.add_parser("evaluate", help="loss of a checkpoint on a text file",
                                   description="Print nats and bits per character of a text.")
    evaluate.add_argument("checkpoint", help="run directory or its checkpoint.json")
    evaluate.add_argument("--data", nargs="+", required=True, metavar="FILE",
                          help="UTF-8 text file(s)")
    evaluate.add_argument("--threads", type=int, default=None, help=THREADS_HELP)

    transcribe = commands.add_parser(
        "transcribe", help="the digits spoken in WAV files (speech checkpoint)",
        description="Print the digit string a trained speech model hears in each WAV file.")
    transcribe.add_argument("checkpoint", help="run directory or its checkpoint.json")
    transcribe.add_argument("wav", nargs="+", help="8 kHz mono PCM WAV file(s)")
    transcribe.add_argument("--beam", type=int, default=8, help="beam width (1: greedy)")
    transcribe.add_argument("--threads", type=int, default=None, help=THREADS_HELP)

    hello = commands.add_parser("hello", help="the classic h-e-l-l-o RNN demo, in seconds",
                                description="Train a 4-symbol RNN to continue 'hell' as 'ello'.")
    hello.add_argument("--steps", type=int, default=100, help="training steps")
    hello.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def _train(args: argparse.Namespace) -> int:
    from rnnkit.tasks import merge_config, task_module
    from rnnkit.train import distributed
    from rnnkit.train.atomic import write_text
    from rnnkit.train.checkpoint import POINTER, load_checkpoint
    from rnnkit.train.config import TrainConfig
    from rnnkit.train.rng import seed_everything
    from rnnkit.train.trainer import Trainer

    group = distributed.init_from_env()
    if not group.is_main:  # rank 0 alone prints; every rank reports its own errors (stderr)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    name = args.task
    module = task_module(name)
    defaults = module.default_config()
    config = defaults
    checkpoint = None
    # torchrun --max-restarts: ranks restarted after a failure continue from the run's checkpoint
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
    if restarted and args.out is not None and (Path(args.out) / POINTER).exists():
        args.resume = True
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out DIR, the run to continue")
        out = Path(args.out)
        checkpoint = load_checkpoint(out)  # refuses a bad checkpoint before anything is written
        saved = out / "config.yaml"
        if saved.is_file():
            config = merge_config(config, _read_config_file(str(saved)), str(saved), name)
    else:
        out = Path(args.out) if args.out else Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")
        out = distributed.broadcast_object(out, group)  # one timestamp for every rank
        if (out / POINTER).exists():
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or "
                             "choose another --out")
    if args.config:
        config = merge_config(config, _read_config_file(args.config), args.config, name)
    config = merge_config(config, _flag_overrides(args, name, defaults), "command-line flags",
                          name)

    train_config = TrainConfig.from_dict(config["train"])
    seed_everything(train_config.seed)
    task, model, source = module.build(config)
    trainer = Trainer(model, task, train_config, out, progress=not args.no_progress)
    if checkpoint is not None:
        if _json_form(checkpoint.meta.get("task")) != _json_form(task.describe()):
            raise ValueError(f"{checkpoint.path} was trained with other data or another model "
                             "than given now; resume with the run's own config")
        trainer.load(checkpoint)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml",
                   yaml.safe_dump({"task": name, **config}, sort_keys=False, allow_unicode=True))

    params = sum(p.numel() for p in model.parameters())
    print(f"data: {source}")
    if hasattr(module, "describe_data"):
        print(f"      {module.describe_data(task)}")
    print(f"model: {type(model).__name__} with {params:,} parameters; run directory {out}")
    if checkpoint is not None:
        print(f"resuming from step {trainer.step} of {train_config.steps}")
    result = trainer.fit()

    if result.valid:
        shown = (module.describe_metrics(result.valid) if hasattr(module, "describe_metrics")
                 else ", ".join(f"{key} {value:.4f}" for key, value in result.valid.items()))
        print(f"step {result.step} ({result.reason}): validation {shown}")
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


def _json_form(value: Any) -> str:
    """A canonical text of JSON-able data (tuples and lists compare equal)."""
    return json.dumps(value, sort_keys=True, default=str)


def _sample(args: argparse.Namespace) -> int:
    from rnnkit.models.language_model import generate
    from rnnkit.tasks.charlm import load_model

    model, vocab, _ = load_model(args.checkpoint)
    print(generate(model, vocab, args.prime, args.length, args.temperature, args.top_k, args.seed))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rnnkit.data.corpus import read_files
    from rnnkit.tasks.charlm import evaluate_text, load_model

    model, vocab, checkpoint = load_model(args.checkpoint)
    text = read_files(args.data)
    seq_len = int(checkpoint.meta["task"].get("data", {}).get("seq_len", 100))
    metrics = evaluate_text(model, vocab, text, seq_len=seq_len, skip_unknown=True)
    unit = "byte" if vocab.byte_level else "char"
    skipped = int(metrics["unknown"])
    note = f"; {skipped:,} symbols outside the vocabulary left out" if skipped else ""
    print(f"{metrics['loss']:.4f} nats/{unit}  {metrics['bpc']:.4f} bits/{unit}  "
          f"({int(metrics['symbols']):,} symbols of {', '.join(args.data)}{note})")
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    from rnnkit.tasks.speech import load_model, transcribe

    model, extractor, _ = load_model(args.checkpoint)
    for path in args.wav:
        digits = transcribe(model, extractor, path, beam_width=args.beam)
        print(f"{path}\t{digits}" if len(args.wav) > 1 else digits)
    return 0


def _hello(args: argparse.Namespace) -> int:
    from rnnkit.tasks.hello import run_hello

    return 0 if run_hello(steps=args.steps, seed=args.seed) == "ello" else 1


def _rank_tag() -> str:
    """" (rank N)" in a job of several processes, so a message says which one wrote it."""
    rank = os.environ.get("RANK")
    return f" (rank {rank})" if rank not in (None, "0") else ""


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(raw)
    from rnnkit.data.audio import AudioError
    from rnnkit.data.vocab import UnknownSymbolError
    from rnnkit.train.checkpoint import CheckpointError
    from rnnkit.train.distributed import RankLostError, shutdown
    from rnnkit.train.trainer import DivergenceError

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None and nproc != 1 and "WORLD_SIZE" not in os.environ:
        from rnnkit.train.distributed import launch, strip_option

        try:
            return launch(nproc, strip_option(raw, "--nproc-per-node"))
        except ValueError as error:
            print(f"rnnkit {args.command}: error: {error}", file=sys.stderr)
            return 2
    handlers = {"train": _train, "sample": _sample, "evaluate": _evaluate,
                "transcribe": _transcribe, "hello": _hello}
    try:
        return handlers[args.command](args)
    except RankLostError as error:
        print(f"rnnkit {args.command}: error{_rank_tag()}: {error}", file=sys.stderr)
        return 1
    except (CheckpointError, DivergenceError, UnknownSymbolError, ValueError,
            FileNotFoundError, AudioError) as error:
        # the ranks of a job run the same code on the same options: one line per machine
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"rnnkit {args.command}: error{_rank_tag()}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops cleanly by itself)
        print(f"rnnkit {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()  # leave a torchrun job's process group (nothing for one process)


if __name__ == "__main__":
    sys.exit(main())
