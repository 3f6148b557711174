"""Typed options: declared once on the config dataclasses, checked in one place, for every task.

Why a small layer of our own and not jsonargparse (which builds flags, config files and help from
dataclasses): the tasks present their dataclasses with task-specific defaults, leave out options
derived from the data (vocabulary sizes) and redeclare a few (``model.chars`` on/off), and the
command line must keep its existing flag names (``--hidden`` is ``model.hidden`` for charlm and
``model.recurrent.hidden`` for digits), refuse options that cannot change on ``--resume``, and
report every bad value as one line naming the option with exit code 2 — jsonargparse prints
multi-line usage errors and its own flag names, and would add a dependency with its own typing
rules. What is needed is about 400 lines: :mod:`values` (a field's type and range, the one
``coerce``), :mod:`schema` (a task's option tree and merging), :mod:`files` (YAML/TOML with file
and line in errors) and :mod:`command` (flags and per-task help generated from the schema).
"""

from rnnkit.options.files import read_config_file
from rnnkit.options.schema import Leaf, TaskSchema
from rnnkit.options.values import (
    Kind,
    OptionError,
    Options,
    Rule,
    Spec,
    build,
    coerce,
    describe,
    field_specs,
    option,
)

__all__ = [
    "Kind", "Leaf", "OptionError", "Options", "Rule", "Spec", "TaskSchema", "build", "coerce",
    "describe", "field_specs", "option", "read_config_file",
]
