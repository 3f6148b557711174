"""A task's options as one tree derived from its config dataclasses, and the layers merged over it.

A task module has ``SECTIONS`` (section name → config dataclass) and ``default_config()`` (the
task's defaults, a dict per section without the options derived from the data). The schema walks
the two together: every key of the defaults is a field of its section's dataclass (nested config
dataclasses are groups), so each option's type, range and help come from the field and its
default from the task. ``TASK_OPTIONS`` in a task module may redeclare an option the task
presents differently from the model (sentiment's ``model.chars`` is on/off; the model's is the
character vocabulary size, derived from the data).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, is_dataclass
from types import ModuleType
from typing import Any

from rnnkit.options.values import (
    Kind,
    OptionError,
    Rule,
    Spec,
    coerce,
    field_specs,
    parse_text,
    unknown_option,
)


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    spec: Spec  # spec.default is the task's default

    @property
    def name(self) -> str:
        return ".".join(self.path)


class TaskSchema:
    """Every option of one task: defaults, checking, merging and the differences of two configs."""

    def __init__(self, task: str, sections: Mapping[str, type], defaults: Mapping[str, Any],
                 overrides: Mapping[str, Spec] | None = None) -> None:
        self.task = task
        self.defaults = copy.deepcopy(dict(defaults))
        self.overrides = dict(overrides or {})
        self.leaves: dict[str, Leaf] = {}
        self.groups: dict[str, list[str]] = {"": list(self.defaults)}  # group → its keys
        for section, values in self.defaults.items():
            if section not in sections:
                raise TypeError(f"the {task} task's defaults have a section {section!r} "
                                "without a config dataclass")
            self._walk(sections[section], values, (section,))

    @classmethod
    def of(cls, module: ModuleType) -> TaskSchema:
        return cls(module.NAME, module.SECTIONS, module.default_config(),
                   getattr(module, "TASK_OPTIONS", None))

    def _walk(self, config_class: type, values: Mapping[str, Any], path: tuple[str, ...]) -> None:
        self.groups[".".join(path)] = list(values)
        specs = field_specs(config_class)
        for key, default in values.items():
            where = (*path, key)
            dotted = ".".join(where)
            spec = self.overrides.get(dotted) or specs.get(key)
            if spec is None:
                raise TypeError(f"{self.task} default {dotted} is not a field of "
                                f"{config_class.__name__}")
            base = spec.kind.base
            if is_dataclass(base) or spec.rule.schema is not None:
                nested = base if is_dataclass(base) else spec.rule.schema
                self._walk(nested, default, where)
            else:
                self.leaves[dotted] = Leaf(where, Spec(spec.kind, spec.rule, default))

    # --- merging ---------------------------------------------------------------------------

    def merge(self, config: Mapping[str, Any], update: Mapping[str, Any], source: str,
              from_text: bool = False) -> dict[str, Any]:
        """``update`` (nested sections) over ``config``; every value checked, unknown keys named."""
        merged = copy.deepcopy(dict(config))
        if not isinstance(update, Mapping):
            raise OptionError("", f"{source} must hold a mapping of sections, got {update!r}")
        for key, value in update.items():
            if key == "task":
                if value != self.task:
                    raise OptionError("", f"{source} is a {value!r} config, not a {self.task} one")
                continue
            self._apply(merged, (str(key),), value, source, from_text)
        return merged

    def set(self, config: dict[str, Any], dotted: str, value: Any, source: str,
            from_text: bool = False) -> dict[str, Any]:
        """One option by its dotted name (``--set model.hidden=64``, a flag)."""
        merged = copy.deepcopy(config)
        self._apply(merged, tuple(dotted.split(".")), value, source, from_text)
        return merged

    def _apply(self, config: dict[str, Any], path: tuple[str, ...], value: Any, source: str,
               from_text: bool) -> None:
        dotted = ".".join(path)
        if dotted in self.leaves:
            spec = self.leaves[dotted].spec
            try:
                if from_text and isinstance(value, str):
                    value = parse_text(value, spec, dotted)
                value = coerce(value, spec, dotted)
            except OptionError as error:
                raise OptionError(error.name, f"{error.problem} ({source})", error.sep) from None
            target = config
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            return
        if dotted in self.groups:
            if from_text and isinstance(value, str):
                value = parse_text(value, Spec(Kind(dict), Rule()), dotted)
            if not isinstance(value, Mapping):
                raise OptionError(dotted, f"is a section of options, not a value ({source})")
            for key, item in value.items():
                self._apply(config, (*path, str(key)), item, source, from_text)
            return
        for cut in range(1, len(path)):
            if ".".join(path[:cut]) in self.leaves:
                raise OptionError(dotted, f"is not an option: {'.'.join(path[:cut])} is a value, "
                                          f"not a section ({source})")
        parent = ".".join(path[:-1])
        if parent not in self.groups:
            return self._apply(config, path[:-1], {path[-1]: value}, source, from_text)
        error = unknown_option(dotted, self.groups[parent])
        raise OptionError(error.name, f"{error.problem} ({source}; the {self.task} task)")

    # --- comparing -------------------------------------------------------------------------

    def value(self, config: Mapping[str, Any], dotted: str) -> Any:
        for key in dotted.split("."):
            config = config[key]
        return config

    def differences(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
        """Dotted names of the options whose values differ."""
        return [name for name in self.leaves
                if self.value(old, name) != self.value(new, name)]

    def names(self) -> Iterable[str]:
        return self.leaves.keys()

