"""Reading a YAML or TOML file of options: a malformed file is one line naming the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rnnkit.options.values import OptionError


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file (``None`` when it can): missing, a folder, a device."""
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a named pipe"
                if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file")
        return f"is {kind}, not a regular file"
    return None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in ``path`` (``.toml``: TOML; anything else: YAML, safe loader)."""
    file = Path(path)
    problem = file_problem(file)
    if problem:
        raise OptionError("", f"config file {file} {problem}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise OptionError("", f"config file {file} is not UTF-8 text ({error.reason} at byte "
                              f"{error.start})") from None
    if file.suffix == ".toml":
        data = _toml(text, file)
    else:
        data = _yaml(text, file)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError("", f"config file {file} must hold a mapping of sections (data, model, "
                              f"train, ...), got {type(data).__name__}")
    return data


def _yaml(text: str, file: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        # the mark of the problem (else of its context) is where the file goes wrong; 1-based
        mark = error.problem_mark or error.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        problem = error.problem or error.context or "malformed YAML"
        if "could not determine a constructor" in (error.problem or "") and error.problem:
            problem = error.problem.replace("could not determine a constructor for the tag",
                                            "unsupported YAML tag")
        raise OptionError("", f"{where}: {_one_line(problem)}") from None
    except yaml.YAMLError as error:
        raise OptionError("", f"{file}: {_one_line(str(error))}") from None


def _toml(text: str, file: Path) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise OptionError("", f"{file}: TOML configs need Python 3.11 or newer; use YAML") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # tomllib's message ends "(at line L, column C)"
        raise OptionError("", f"{file}: {_one_line(str(error))}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())
