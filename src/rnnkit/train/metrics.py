"""Metrics as JSON lines: one object per record, ``kind`` = "train" (every step) or "valid"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from rnnkit.train.atomic import write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class MetricsLog:
    """Appends records; on resume, drops those past the checkpoint's step so nothing is doubled."""

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        if keep_until_step is not None:
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until_step]
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif path.exists():
            path.unlink()
        self._handle: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
