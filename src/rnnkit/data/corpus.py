"""Text corpora: files given by the user, or the running interpreter's own standard library.

The standard-library corpus is read at run time (never copied anywhere) so ``rnnkit train charlm``
works out of the box with no download: a deterministic, sorted selection of the top-level
``*.py`` modules of ``sysconfig.get_paths()["stdlib"]``.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

from rnnkit.options.files import file_problem

STDLIB_CHARS = 3_000_000


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"))


def read_stdlib(max_chars: int = STDLIB_CHARS) -> tuple[str, list[Path]]:
    """Whole modules in sorted order until ``max_chars``; the text and the files used."""
    parts: list[str] = []
    used: list[Path] = []
    total = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a module we cannot read as UTF-8 simply is not part of the corpus
        if total + len(text) > max_chars and parts:
            break
        parts.append(text)
        used.append(path)
        total += len(text)
    if not parts:
        raise FileNotFoundError(f"no readable *.py files in {sysconfig.get_paths()['stdlib']}")
    return "".join(parts), used


def read_files(paths: Sequence[str | Path]) -> str:
    """The files concatenated, read as UTF-8; a missing or undecodable file is named."""
    parts = []
    for path in paths:
        path = Path(path)
        problem = file_problem(path)
        if problem:
            raise FileNotFoundError(f"data file {path} {problem}")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"data file {path} is not UTF-8 text ({error})") from None
    return "".join(parts)
