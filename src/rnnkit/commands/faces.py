"""``rnnkit sample`` (language models) and ``rnnkit transcribe`` (speech): two faces of
``rnnkit predict``, kept for their familiar flags."""

from __future__ import annotations

import argparse
from typing import Any

from rnnkit.commands import typed


def add_sample_parser(commands: Any, threads_help: str) -> None:
    parser = commands.add_parser("sample", help="generate text from a language model (charlm, wordlm)",
                                 description="Generate text from a trained charlm or wordlm run.",
                                 allow_abbrev=False)
    parser.add_argument("checkpoint", help="run directory, best.json or a checkpoint JSON")
    parser.add_argument("--prime", default="", help="text to start from")
    parser.add_argument("--length", type=typed("length"), default=None,
                        help="symbols (charlm, default 400) or words (wordlm, default 30)")
    parser.add_argument("--temperature", type=typed("temperature"), default=0.8,
                        help="softmax temperature; 0 picks the likeliest symbol")
    parser.add_argument("--top-k", type=typed("top_k"), default=None,
                        help="sample among the k likeliest")
    parser.add_argument("--seed", type=typed("seed"), default=None, help="seed: same seed, same text")
    parser.add_argument("--threads", type=typed("threads"), default=None, help=threads_help)


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
    parser.add_argument("--beam", type=typed("beam"), default=8, help="beam width (1: greedy)")
    parser.add_argument("--threads", type=typed("threads"), default=None, help=threads_help)


def run_transcribe(args: argparse.Namespace) -> int:
    from rnnkit.data.audio import check_audio_path
    from rnnkit.pipelines import load

    for path in args.wav:  # before loading the model: a typo costs nothing
        check_audio_path(path)
    pipeline = load(args.checkpoint, task="speech")
    for result in pipeline.predict(list(args.wav), beam=args.beam):
        print(f"{result.path}\t{result.digits}" if len(args.wav) > 1 else result.digits)
    return 0
