"""Command-line flags and per-task help generated from a :class:`TaskSchema`.

Every option of a task gets a flag named after it (``model.hidden`` → ``--hidden``); when two
options share a name the shallower keeps it and the others are qualified by their group
(``--recurrent-dropout``, ``--encoder-hidden``, ``--decoder-hidden``). Flag values arrive as
text and are read by the same :func:`~rnnkit.options.values.coerce` as file values, so a bad value
is one line naming the option and its flag. ``--set SECTION.OPTION=VALUE`` reaches any option.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Any, NoReturn

from rnnkit.options.schema import Leaf, TaskSchema
from rnnkit.options.values import OptionError, describe

# flags of the train command itself, never generated from options
FIXED = ("data", "set", "config", "out", "resume", "no-progress", "threads", "nproc-per-node",
         "help")
# names kept from the first command line where the option's own name would be ambiguous
LEGACY = {"sample.length": "sample-length"}
DEST = "option:"  # argparse dest prefix of generated flags


class UsageError(Exception):
    """A command line argparse refuses; ``str()`` is the one line to print (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``rnnkit train: error: …``, exit code 2, no usage dump),
    raised as :class:`UsageError` so that ``main()`` returns 2 rather than exiting."""

    task: str | None = None  # the task whose flags the command line has
    command: str | None = None  # the command that has them ("rnnkit train")

    def error(self, message: str) -> NoReturn:
        unknown = "unrecognized arguments: "
        prog = self.command or self.prog
        if message.startswith(unknown):
            first = message[len(unknown):].split()[0]
            where = f"the {self.task} task" if self.task else prog
            help_command = f"{prog} {self.task}" if self.task else prog
            message = (f"{first} is not an option of {where} ({help_command} --help lists them)"
                       if first.startswith("-") else f"unexpected argument {first!r}")
        self.prog = prog
        raise UsageError(f"{self.prog}: error: {message}")


def _kebab(parts: tuple[str, ...]) -> str:
    return "-".join(parts).replace("_", "-")


def flag_names(schema: TaskSchema) -> dict[str, str]:
    """Dotted option name → its flag (without the dashes)."""
    by_name: dict[str, list[Leaf]] = defaultdict(list)
    for leaf in schema.leaves.values():
        by_name[LEGACY.get(leaf.name) or _kebab(leaf.path[-1:])].append(leaf)
    flags: dict[str, str] = {}
    for name, leaves in by_name.items():
        leaves.sort(key=lambda leaf: len(leaf.path))
        for i, leaf in enumerate(leaves):
            shallowest = i == 0 and (len(leaves) == 1 or len(leaves[1].path) > len(leaf.path))
            flags[leaf.name] = name if shallowest else _kebab(leaf.path[1:])
    taken = set(FIXED)
    for dotted, flag in list(flags.items()):
        if flag in taken or list(flags.values()).count(flag) > 1:
            flags[dotted] = _kebab(tuple(dotted.split(".")))
        taken.add(flags[dotted])
    return flags


def _metavar(leaf: Leaf) -> str:
    spec = leaf.spec
    if spec.rule.metavar:
        return spec.rule.metavar
    if spec.choices:
        return "{" + ",".join(str(c) for c in spec.choices) + "}"
    return {int: "N", float: "X", str: "TEXT", list: "PATH"}.get(spec.kind.base, "VALUE")


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]" if value else "[] (none)"
    return str(value)


def help_line(leaf: Leaf) -> str:
    spec = leaf.spec
    text = f"{spec.rule.help.rstrip('.')} [{describe(spec)}; default {_shown(spec.default)}]"
    return text.replace("%", "%%")  # argparse formats help with %


def add_task_flags(parser: argparse.ArgumentParser, schema: TaskSchema) -> dict[str, str]:
    """One flag per option of the task, grouped by section; returns dotted name → flag."""
    flags = flag_names(schema)
    groups: dict[str, Any] = {}
    for dotted, leaf in schema.leaves.items():
        section = leaf.path[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"{section} options (--set {section}.OPTION=VALUE sets any of them)")
        group = groups[section]
        flag = f"--{flags[dotted]}"
        if leaf.spec.kind.base is bool:
            group.add_argument(flag, dest=DEST + dotted, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_line(leaf))
        else:
            group.add_argument(flag, dest=DEST + dotted, default=argparse.SUPPRESS,
                               metavar=_metavar(leaf), help=help_line(leaf))
    return flags


def apply_flags(schema: TaskSchema, config: dict[str, Any], args: argparse.Namespace,
                flags: dict[str, str]) -> dict[str, Any]:
    """``config`` with the generated flags given on the command line, then every ``--set``."""
    for dest, value in vars(args).items():
        if dest.startswith(DEST):
            dotted = dest[len(DEST):]
            config = schema.set(config, dotted, value, f"--{flags[dotted]}", from_text=True)
    for assignment in getattr(args, "set", None) or []:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key or "." not in key:
            raise OptionError("--set", f"expects SECTION.OPTION=VALUE, got {assignment!r}")
        config = schema.set(config, key, text, f"--set {key}", from_text=True)
    return config


def parse_value(spec_leaf: Leaf, flag: str) -> Any:
    """An argparse ``type=`` for a fixed flag checked by the same rules (``--threads``, …)."""
    from rnnkit.options.values import coerce, parse_text

    def parse(text: str) -> Any:
        try:
            return coerce(parse_text(text, spec_leaf.spec, flag), spec_leaf.spec, flag)
        except OptionError as error:
            raise argparse.ArgumentTypeError(error.problem) from None

    parse.__name__ = flag
    return parse


def flag_type(cls: type, name: str, flag: str) -> Any:
    """argparse ``type=`` checking flag ``flag`` by the rules of field ``name`` of the config
    dataclass ``cls`` (for the flags of commands other than ``train TASK``)."""
    from rnnkit.options.values import field_specs

    return parse_value(Leaf((name,), field_specs(cls)[name]), flag)


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
