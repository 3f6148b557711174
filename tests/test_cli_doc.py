"""docs/cli.md follows the program (issue 17, item 6): its generated blocks are what real runs
print (docs/make_cli_md.py writes them; here they are re-run and compared, numbers masked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "make_cli_md.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_cli_md", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_doc_has_generated_blocks_for_the_main_commands() -> None:
    make = _script()
    commands = [c for b in make.blocks(make.DOC.read_text(encoding="utf-8")) for c in b.commands]
    for expected in ("rnnkit hello", "rnnkit tasks", "rnnkit train charlm --out runs/default",
                     "rnnkit train tagging --data snips/train"):
        assert any(c.startswith(expected) for c in commands), expected
    for block in make.blocks(make.DOC.read_text(encoding="utf-8")):
        assert block.body.startswith(f"$ {block.commands[0]}\n"), block.commands[0]


def test_masking_keeps_the_format_and_drops_numbers_and_samples() -> None:
    make = _script()
    a = "model: LanguageModel with 38,827 parameters\n--- sample 1 ---\nxyz\n---\nstep 150\n"
    b = "model: LanguageModel with 1 parameters\n--- sample 1 ---\nabc\n---\nstep 9\n"
    assert make.masked(a) == make.masked(b)
    assert make.masked(a) != make.masked(a.replace("LanguageModel with", "1-layer LSTM,"))


def test_quick_blocks_match_real_runs(tmp_path: Path) -> None:
    """The blocks that need no trained run (hello, tasks, the option and --data errors)."""
    make = _script()
    make.scratch(tmp_path)
    checked = 0
    for block in make.blocks(make.DOC.read_text(encoding="utf-8")):
        if block.slow or any("runs/" in c for c in block.commands):
            continue
        fresh = make.transcript(block, tmp_path, in_process=True)
        assert make.masked(fresh) == make.masked(block.body), fresh
        checked += 1
    assert checked >= 4


@pytest.mark.slow
def test_every_quick_block_matches_real_runs() -> None:
    assert _script().main(["--check"]) == 0
