"""``rnnkit sample`` (language models) and ``rnnkit transcribe`` (speech): two faces of
``rnnkit predict``, kept for their familiar flags."""

from __future__ import annotations

import argparse
from typing import Any

from rnnkit.commands import flag_options


def add_sample_parser(commands: Any, threads_help: str) -> None:
    parser = commands.add_parser("sample", help="generate text from a language model (charlm, wordlm)",
                                 description="Generate text from a trained charlm or wordlm run.",
                                 allow_abbrev=False)
    parser.add_argument("checkpoint", help="run directory, best.json or a checkpoint JSON")
    parser.add_argument("--prime", default="", metavar="TEXT", help="text to start from")
    parser.add_argument("--length", default=None, **flag_options(
        "length", "symbols (charlm, default 400) or words (wordlm, default 30)"))
    parser.add_argument("--temperature", default=0.8, **flag_options(
        "temperature", "softmax temperature; 0 picks the likeliest symbol", 0.8))
    parser.add_argument("--top-k", default=None, **flag_options("top_k", "sample among the k likeliest"))
    parser.add_argument("--seed", default=None, **flag_options("seed", "seed: same seed, same text"))
    parser.add_argument("--threads", default=None, **flag_options("threads", threads_help))


def run_sample(args: argparse.Namespace) -> int:
    from rnnkit.pipelines import load

    pipeline = load(args.checkpoint)
    if pipeline.task not in ("charlm", "wordlm"):
        raise ValueError(f"{args.checkpoint} is a {pipeline.task!r} run, not a language model "
                         "(charlm or wordlm); use rnnkit predict")
    length = args.length if args.length is not None else (400 if pipeline.task == "charlm" else 30)
    result = pipeline.predict(args.prime, length=length, temperature=args.temperature,
                              top_k=args.top_k, seed=args.seed)
    print(result)
    return 0


def add_transcribe_parser(commands: Any, threads_help: str) -> None:
    parser = commands.add_parser(
        "transcribe", help="the digits spoken in WAV files (speech run)",
        description="Print the digit string a trained speech model hears in each WAV file.",
        allow_abbrev=False)
    parser.add_argument("checkpoint", help="run directory, best.json or a checkpoint JSON")
    parser.add_argument("wav", nargs="+", help="PCM WAV file(s) at the model's sample rate")
    parser.add_argument("--beam", default=8, **flag_options("beam", "beam width (1: greedy)", 8))
    parser.add_argument("--threads", default=None, **flag_options("threads", threads_help))


def run_transcribe(args: argparse.Namespace) -> int:
    from rnnkit.data.audio import check_audio_path
    from rnnkit.pipelines import load

    for path in args.wav:  # before loading the model: a typo costs nothing
        check_audio_path(path)
    pipeline = load(args.checkpoint, task="speech")
    for result in pipeline.predict(list(args.wav), beam=args.beam):
        print(f"{result.path}\t{result.digits}" if len(args.wav) > 1 else result.digits)
    return 0
