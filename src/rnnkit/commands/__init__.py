"""The subcommands that use a trained run: ``predict``, ``evaluate``, ``sample``, ``transcribe``.

Each module has ``add_parser(commands, threads_help)`` and ``run(args) -> exit code``; all of them
go through :func:`rnnkit.load`, so every task is served by the same machinery. Their flags are
declared once, in :class:`RunOptions`, and checked by the option layer (:mod:`rnnkit.options`)
while the command line is parsed: a bad value is one line naming the flag, exit code 2, before
any run is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rnnkit.options import Options, describe, field_specs, option
from rnnkit.options.command import flag_type


@dataclass
class RunOptions(Options):
    """The options of the commands that use a trained run (their defaults depend on the task:
    a flag not given leaves the pipeline's own default)."""

    beam: int = option(8, "beam width (1: greedy)", ge=1)
    temperature: float = option(0.8, "sampling temperature; 0 picks the likeliest symbol", ge=0)
    top_k: int | None = option(None, "sample among the k likeliest symbols (none: all)", ge=1)
    length: int = option(400, "symbols (charlm) or words (wordlm) to generate", ge=0)
    steps: int = option(64, "time steps of music to generate", ge=0)
    seed: int | None = option(None, "random seed: same seed, same output", ge=0, le=2**63 - 1)
    out: str = option("generated.mid", "MIDI file to write (music)", metavar="FILE")
    batch_size: int = option(32, "inputs per batched call", ge=1)
    split: str = option("test", "the split of a .mat file (music)",
                        choices=("train", "valid", "test"))
    threads: int | None = option(None, "torch CPU threads", ge=1)


def typed(name: str, flag: str | None = None) -> Any:
    """argparse ``type=`` for the flag of :class:`RunOptions` field ``name``."""
    return flag_type(RunOptions, name, flag or "--" + name.replace("_", "-"))


def flag_options(name: str, text: str, default: Any = None) -> dict[str, Any]:
    """``add_argument`` keywords for the flag of :class:`RunOptions` field ``name``: its check,
    a metavar and the help ``text`` with what the flag accepts (as ``train TASK --help`` shows)."""
    spec = field_specs(RunOptions)[name]
    metavar = spec.rule.metavar or ("{" + ",".join(spec.choices) + "}" if spec.choices else
                                    {int: "N", float: "X"}.get(spec.kind.base, "TEXT"))
    shown = f"; default {default}" if default is not None else ""
    return {"type": typed(name), "metavar": metavar,
            "help": f"{text} [{describe(spec)}{shown}]".replace("%", "%%")}
