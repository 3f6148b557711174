"""``rnnkit predict RUN [INPUT ...]``: the trained model's answer for each input, one per line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rnnkit.commands import flag_options
from rnnkit.options import OptionError

# flag → (predict option, help); each is checked by its RunOptions field while parsing, and
# passed on only when given, and only to a pipeline that takes it
OPTION_FLAGS: list[tuple[str, str, str]] = [
    ("--beam", "beam", "beam width (translate, speech; 1: greedy)"),
    ("--temperature", "temperature", "sampling temperature (charlm, wordlm, music; 0: likeliest)"),
    ("--top-k", "top_k", "sample among the k likeliest symbols (charlm, wordlm)"),
    ("--length", "length", "symbols (charlm) or words (wordlm) to generate"),
    ("--steps", "steps", "time steps to generate (music)"),
    ("--seed", "seed", "random seed: same seed, same output (charlm, wordlm, music)"),
    ("--out", "out", "MIDI file to write (music; default generated.mid)"),
]
PROGRESS_ABOVE = 256  # inputs: a bar on stderr for more than this
GENERATORS = ("charlm", "wordlm", "music")  # with no inputs they start from nothing


def add_parser(commands: Any, threads_help: str) -> None:
    parser = commands.add_parser(
        "predict", help="a trained model's answer for each input (every task)",
        description="Run a trained model on inputs: sentences (sentiment, tagging, translate), "
                    "primes (charlm, wordlm), WAV files (speech), image files or 64 numbers "
                    "(digits), a MIDI primer or nothing (music). Inputs come as arguments, one "
                    "per line from --input FILE ('-': stdin), or on stdin when no argument is given "
                    "(charlm, wordlm and music without inputs start from nothing; --input - reads theirs "
                    "from stdin).",
        allow_abbrev=False)
    parser.add_argument("run", help="run directory (its best weights), best.json or a checkpoint JSON")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs to predict")
    parser.add_argument("--input", metavar="FILE", help="a file of inputs, one per line ('-': stdin)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--batch-size", default=32,
                        **flag_options("batch_size", "inputs per batched call", 32))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, name, text in OPTION_FLAGS:
        parser.add_argument(flag, default=argparse.SUPPRESS, **flag_options(name, text))
    parser.add_argument("--threads", default=None, **flag_options("threads", threads_help))


def read_inputs(args: argparse.Namespace, task: str) -> list[str | None]:
    """Inputs from the arguments, --input FILE or stdin; an empty line is refused by name."""
    if args.inputs and args.input:
        raise ValueError("give inputs as arguments or with --input, not both")
    if args.inputs:
        return list(args.inputs)
    source = args.input
    if source is None and task in GENERATORS:
        return [None if task == "music" else ""]  # generate from nothing
    if source is None and not sys.stdin.isatty():
        source = "-"
    if source is None:
        raise ValueError("no inputs: give them as arguments, with --input FILE or on stdin")
    name = "stdin" if source == "-" else source
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no input
        except UnicodeDecodeError:
            raise ValueError(f"input file {path} is not UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{name}, line {number}: empty line (give one input per line)")
    if not lines:
        raise ValueError(f"{name} holds no inputs")
    return [line.rstrip("\r") for line in lines]


def run(args: argparse.Namespace) -> int:
    from rnnkit.pipelines import load

    pipeline = load(args.run)
    options = {option: getattr(args, option) for _, option, _ in OPTION_FLAGS
               if hasattr(args, option)}
    refused = [flag for flag, option, _ in OPTION_FLAGS
               if option in options and option not in pipeline.options]
    if refused:
        takes = ", ".join("--" + o.replace("_", "-") for o in pipeline.options) or "no options"
        raise OptionError(", ".join(refused), f"is not an option of the {pipeline.task} "
                                              f"pipeline (it takes {takes})")
    if pipeline.task == "music" and "out" not in options:
        options["out"] = "generated.mid"  # on the shell the music is only useful as a file
    raw = read_inputs(args, pipeline.task)
    inputs = [pipeline.parse(item) if isinstance(item, str) else item for item in raw]
    bar = None
    if len(inputs) > PROGRESS_ABOVE and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), file=sys.stderr, unit="input", leave=False)
    done = 0
    for results in pipeline.iter_predict(inputs, args.batch_size, **options):
        for result in results:
            done += 1
            if args.json:
                print(json.dumps(result.to_dict(), ensure_ascii=False))
                continue
            text = str(result)
            if "\n" in text and len(inputs) > 1:  # generated text of several lines: mark each
                print(f"--- {done} ---")
            print(text)
        sys.stdout.flush()
        if bar is not None:
            bar.update(len(results))
    if bar is not None:
        bar.close()
    return 0

