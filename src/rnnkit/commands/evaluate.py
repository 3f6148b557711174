"""``rnnkit evaluate RUN --data PATH``: the metrics validation prints, on any data of the task."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rnnkit.commands import flag_options
from rnnkit.options import OptionError

DATA_HELP = ("charlm: text files or folders; wordlm: PTB-style text; speech: a folder of "
             "{digit}_{speaker}_{take}.wav; digits: a UCI optdigits file; sentiment: a TSV with "
             "a header (label, sentence/content/text); tagging: an ATIS folder or a CoNLL file; "
             "translate: a source<TAB>target TSV or a stem with .<src>/.<tgt> files; music: a "
             ".mat file (its --split), a MIDI file or a folder of them")


def add_parser(commands: Any, threads_help: str) -> None:
    parser = commands.add_parser(
        "evaluate", help="a trained model's metrics on data in its task's format (every task)",
        description="Score a trained run on a file or folder in its task's data format, with the "
                    "metrics and the code its validation uses.",
        allow_abbrev=False)
    parser.add_argument("run", help="run directory (its best weights), best.json or a checkpoint JSON")
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH", help=DATA_HELP)
    parser.add_argument("--batch-size", default=None, **flag_options(
        "batch_size", "examples per batched call (default: the run's eval_batch_size)"))
    parser.add_argument("--split", default=None,
                        **flag_options("split", "music: the split of a .mat file", "test"))
    parser.add_argument("--json", action="store_true", help="one JSON object per data path")
    parser.add_argument("--threads", default=None, **flag_options("threads", threads_help))


def run(args: argparse.Namespace) -> int:
    from rnnkit.pipelines import load

    pipeline = load(args.run)
    extra: dict[str, Any] = {}
    if args.split is not None:
        if pipeline.task != "music":
            raise OptionError("--split", f"is an option of the music task, not of {pipeline.task}")
        extra["split"] = args.split
    for path in args.data:
        metrics = pipeline.evaluate(path, batch_size=args.batch_size, **extra)
        if args.json:
            print(json.dumps({"data": path, **metrics}))
        else:
            print(f"{pipeline.describe_metrics(metrics)}  — {path}")
    return 0
