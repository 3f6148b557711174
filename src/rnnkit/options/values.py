"""One option's declared type and range, and the one function that checks a value against them.

A configuration dataclass declares each option as a field with a type annotation (``int``,
``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``list[str]``, a nested config
dataclass, or ``dict`` checked against another dataclass) and, through :func:`option`, its range,
choices and one line of help. :func:`coerce` is the only place a value is checked: every source
(Python arguments, YAML/TOML files, ``--flags``, ``--set``, checkpoint metadata) goes through it,
and a bad value raises :class:`OptionError` naming the option by its dotted name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin

# words a command-line value may use for "no value" in an option declared ``X | None``
NONE_WORDS = ("none", "null", "off", "full", "~")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class OptionError(ValueError):
    """A bad option value or name; ``str()`` is one line naming the option."""

    def __init__(self, name: str, problem: str, sep: str = " ") -> None:
        # "model.hidden must be an integer ≥ 1, got 'abc'"; sep ": " for a sentence of its own
        super().__init__(f"{name}{sep}{problem}" if name else problem)
        self.name, self.problem, self.sep = name, problem, sep

    def renamed(self, name: str) -> OptionError:
        return OptionError(name, self.problem, self.sep)


@dataclass(frozen=True)
class Rule:
    """What :func:`option` records in a field's metadata."""

    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    empty_ok: bool = False  # a str option for which "" means something (a prime, a prefix)
    on_resume: bool = False  # may change when a run is continued with --resume
    schema: type | None = None  # a dict option checked against this dataclass's fields
    metavar: str | None = None


RULE_KEY = "rnnkit.option"


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING,
           **rule: Any) -> Any:
    """A dataclass field with its help, range (``ge``/``gt``/``le``/``lt``), ``choices``, …"""
    meta = {RULE_KEY: Rule(help=help, **rule)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Kind:
    """A declared type reduced to what checking needs."""

    base: Any  # int, float, bool, str, list, dict, or a dataclass
    optional: bool = False
    item: Any = None  # list item type
    choices: tuple[Any, ...] | None = None  # from Literal[...]


def kind_of(annotation: Any) -> Kind:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported option type {annotation!r}")
        return dataclasses.replace(kind_of(rest[0]), optional=len(rest) < len(args))
    if origin is Literal:
        return Kind(type(args[0]), choices=tuple(args))
    if origin in (list, tuple):
        return Kind(list, item=args[0] if args else Any)
    if origin is dict or annotation is dict:
        return Kind(dict)
    return Kind(annotation)


@dataclass(frozen=True)
class Spec:
    """One option: its kind, rule and (for task schemas) its default."""

    kind: Kind
    rule: Rule
    default: Any = None

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return self.rule.choices or self.kind.choices


_SPECS: dict[type, dict[str, Spec]] = {}


def field_specs(cls: type) -> dict[str, Spec]:
    """The :class:`Spec` of every field of a config dataclass (cached per class)."""
    if cls not in _SPECS:
        hints = typing.get_type_hints(cls)
        specs = {}
        for f in fields(cls):
            default = (f.default if f.default is not MISSING else
                       f.default_factory() if f.default_factory is not MISSING else None)
            specs[f.name] = Spec(kind_of(hints[f.name]), f.metadata.get(RULE_KEY, Rule()), default)
        _SPECS[cls] = specs
    return _SPECS[cls]


def describe(spec: Spec) -> str:
    """What an option accepts, in words: 'an integer ≥ 1', 'one of lstm, gru, rnn', …"""
    kind, rule = spec.kind, spec.rule
    if spec.choices:
        text = "one of " + ", ".join(str(c) for c in spec.choices)
    elif kind.base is bool:
        text = "true or false"
    elif kind.base is int:
        text = "an integer"
    elif kind.base is float:
        text = "a finite number"
    elif kind.base is str:
        text = "text" if rule.empty_ok else "non-empty text"
    elif kind.base is list:
        text = "a list (or a single value)"
    elif kind.base is dict or is_dataclass(kind.base):
        text = "a mapping of options"
    else:
        text = getattr(kind.base, "__name__", str(kind.base))
    bounds = [f"≥ {_num(rule.ge)}" if rule.ge is not None else "",
              f"> {_num(rule.gt)}" if rule.gt is not None else "",
              f"≤ {_num(rule.le)}" if rule.le is not None else "",
              f"< {_num(rule.lt)}" if rule.lt is not None else ""]
    bounds = [b for b in bounds if b]
    if bounds:
        text += " " + " and ".join(bounds)
    if kind.optional:
        text += ", or none"
    return text


def _num(value: float) -> str:
    if isinstance(value, int) and value > 2**20 and (value + 1) & value == 0:
        return f"2^{value.bit_length()} − 1"  # a seed's bound, readable
    return str(int(value)) if float(value).is_integer() else str(value)


def _bad(name: str, spec: Spec, value: Any) -> OptionError:
    shown = "an empty value" if value in ("", None) else repr(value)
    return OptionError(name, f"must be {describe(spec)}, got {shown}")


def parse_text(text: str, spec: Spec, name: str) -> Any:
    """A value typed on the command line (always a string) read as the option's type."""
    kind = spec.kind
    if kind.optional and text.strip().lower() in NONE_WORDS and kind.base is not bool:
        return None
    if kind.base is str:
        return text
    if kind.base is list:
        if text.lstrip().startswith("["):
            return _yaml_scalar(text, name)
        return [text]
    if kind.base is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise _bad(name, spec, text)
    if kind.base is dict or is_dataclass(kind.base):
        return _yaml_scalar(text, name)
    return text.strip()  # numbers: coerce reads the text itself (YAML reads 1e-3 as text)


def _yaml_scalar(text: str, name: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise OptionError(name, f"cannot read {text!r}: {str(error).splitlines()[0]}") from None


def coerce(value: Any, spec: Spec, name: str) -> Any:
    """``value`` checked against ``spec``: the value to store, or :class:`OptionError`."""
    kind, rule = spec.kind, spec.rule
    if value is None:
        if kind.optional:
            return None
        raise _bad(name, spec, value)
    base = kind.base
    if base is bool:
        if isinstance(value, bool):
            return value
        raise _bad(name, spec, value)
    if base is int:
        value = _integer(value, spec, name)
    elif base is float:
        value = _number(value, spec, name)
    elif base is str:
        if not isinstance(value, str) or (not value and not rule.empty_ok):
            raise _bad(name, spec, value)
    elif base is list:
        if isinstance(value, str):
            value = [value]  # one path where a list of paths is expected
        if not isinstance(value, (list, tuple)):
            raise _bad(name, spec, value)
        item = Spec(kind_of(kind.item), Rule()) if kind.item is not Any else None
        value = [coerce(v, item, f"{name}[{i}]") if item else v for i, v in enumerate(value)]
    elif is_dataclass(base):
        return build(base, value, name)
    elif base is dict:
        if not isinstance(value, Mapping):
            raise _bad(name, spec, value)
        if rule.schema is not None:
            return dataclasses.asdict(build(rule.schema, value, name))
        return dict(value)
    choices = spec.choices
    if choices is not None and value not in choices:
        raise _bad(name, spec, value)
    if isinstance(value, (int, float)) and not _in_range(value, rule):
        raise _bad(name, spec, value)
    return value


def _integer(value: Any, spec: Spec, name: str) -> int:
    if isinstance(value, bool):
        raise _bad(name, spec, value)
    if isinstance(value, int):
        return value
    number: Any = value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise _bad(name, spec, value) from None
    # 6.0 is six; 6.5 is an error, never rounded (a run of "6.5 steps" is a typo)
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _bad(name, spec, value)


def _number(value: Any, spec: Spec, name: str) -> float:
    if isinstance(value, bool):
        raise _bad(name, spec, value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            value = float(value.strip())
        except ValueError:
            raise _bad(name, spec, value) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, spec, value)
    return float(value)


def _in_range(value: float, rule: Rule) -> bool:
    return ((rule.ge is None or value >= rule.ge) and (rule.gt is None or value > rule.gt)
            and (rule.le is None or value <= rule.le) and (rule.lt is None or value < rule.lt))


def build(cls: type, data: Any, where: str = "") -> Any:
    """An instance of config dataclass ``cls`` from a mapping, every value checked.

    ``where`` is the dotted name of the mapping (``model.recurrent``) for the messages; a check
    of several fields together (``__post_init__``) is reported under it.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise OptionError(where, f"must be a mapping of options, got {data!r}")
    specs = field_specs(cls)
    prefix = f"{where}." if where else ""
    values = {}
    for key, value in data.items():
        if key not in specs:
            raise unknown_option(f"{prefix}{key}", list(specs))
        values[key] = coerce(value, specs[key], f"{prefix}{key}")
    try:
        return cls(**values)
    except OptionError as error:
        raise error.renamed(f"{prefix}{error.name}") from None
    except (ValueError, TypeError) as error:
        raise OptionError(where, str(error), sep=": ") from None


def unknown_option(name: str, known: list[str]) -> OptionError:
    import difflib

    leaf = name.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return OptionError(name, f"is an unknown option; {hint}known here: {', '.join(sorted(known))}")


def check_fields(instance: Any) -> None:
    """Checks (and normalises: 3 → 3.0, a dict → its dataclass) every field of ``instance``."""
    for key, spec in field_specs(type(instance)).items():
        value = coerce(getattr(instance, key), spec, key)
        object.__setattr__(instance, key, value)  # also for frozen dataclasses


class Options:
    """Mixin for configuration dataclasses: fields checked on construction, dict round trip.

    Subclasses that check several fields together define ``__post_init__`` and call
    ``super().__post_init__()`` first.
    """

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> Any:
        return build(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]
