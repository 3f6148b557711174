"""Every task `rnnkit tasks` lists has an explorer page, so a new task cannot forget one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rnnkit.explore.analysis import EXPLORERS
from rnnkit.tasks import TASKS

PAGE_KINDS = ("next_symbol", "tags", "classes", "ctc", "attention", "pitches", "adding", "copy",
              "tree")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_has_an_explorer(task: str) -> None:
    assert task in EXPLORERS, (
        f"the task {task!r} has no page in rnnkit explore: add an explorer for it to EXPLORERS "
        f"in src/rnnkit/explore/analysis.py, with tests in tests/explore/")


def test_no_explorer_for_a_task_that_does_not_exist() -> None:
    assert set(EXPLORERS) <= set(TASKS), set(EXPLORERS) - set(TASKS)


def test_the_page_draws_every_kind_of_prediction() -> None:
    """Each prediction kind an explorer sends has its own branch in the page's script, and each
    is produced by some explorer (a kind without a branch would show an empty panel)."""
    root = Path(__file__).resolve().parents[2] / "src" / "rnnkit" / "explore"
    script = (root / "static" / "app.js").read_text(encoding="utf-8")
    source = (root / "analysis.py").read_text(encoding="utf-8")
    sent = set(re.findall(r'"kind": "([a-z_]+)"', source))
    assert sent == set(PAGE_KINDS)
    for kind in PAGE_KINDS:
        assert f'p.kind === "{kind}"' in script or f"{kind}: " in script, kind
