"""The classic hello example learns h→e→l→l→o."""

from __future__ import annotations

import pytest

from rnnkit.cli import main


def test_hello_prints_ello(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hello"]) == 0
    out = capsys.readouterr().out
    assert "predicted: ello" in out
    assert out.count("→") >= 4  # one distribution line per input symbol
