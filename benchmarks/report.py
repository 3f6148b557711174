"""Writing a benchmark's table into its own section of a shared markdown file.

Several benchmarks report into docs/performance.md; each owns the text between its markers
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` and rewrites only that, so re-running one never
erases another's table. A section not yet in the file is appended.
"""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, name: str, text: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    section = f"{start}\n{text.rstrip()}\n{end}\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end) + "\n?", re.S)
    new = (pattern.sub(lambda _: section, old) if pattern.search(old)
           else old.rstrip("\n") + ("\n\n" if old else "") + section)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")
