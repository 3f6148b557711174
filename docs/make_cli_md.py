"""Regenerates the transcripts in docs/cli.md from real runs, so the doc cannot drift.

Every block of docs/cli.md between ``<!-- cli: COMMAND... -->`` and ``<!-- /cli -->`` is the
transcript of those commands (one per line; ``slow`` after ``cli`` marks a long one), run with
``python -m rnnkit`` in a scratch directory holding the doc's small data (``cats.txt``, a
``snips`` folder in the ATIS layout), on one thread, with paths shown as a user would see
them. ``--check`` compares instead of writing (tests/test_cli_doc.py runs it on the quick
blocks, with numbers masked so that another CPU's rounding is not a drift).

    python docs/make_cli_md.py            # rewrite the quick blocks
    python docs/make_cli_md.py --slow     # and the long ones (the README's main command)
    python docs/make_cli_md.py --check    # exit 1 naming the first block that differs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent / "cli.md"
BLOCK = re.compile(r"<!-- cli(?P<slow> slow)?: (?P<commands>[^\n]*?) -->\n```\n(?P<body>.*?)```\n"
                   r"<!-- /cli -->", re.S)
CATS = "the cat sat on the mat. 고양이가 매트 위에 앉았다. বিড়াল মাদুরে বসল। 猫坐在垫子上。\n" * 40


@dataclass
class Block:
    start: int
    end: int
    commands: list[str]
    slow: bool
    body: str


def blocks(text: str) -> list[Block]:
    return [Block(m.start(), m.end(), [c.strip() for c in m["commands"].split(" ;; ")],
                  bool(m["slow"]), m["body"]) for m in BLOCK.finditer(text)]


def scratch(root: Path) -> None:
    """The small data the doc's commands read."""
    (root / "cats.txt").write_text(CATS, encoding="utf-8")
    cities = [("boston", "denver"), ("denver", "boston"), ("new york", "boston")]
    for split in ("train", "dev", "test"):
        folder = root / "snips" / split
        folder.mkdir(parents=True)
        words, tags, labels = [], [], []
        for a, b in cities * 4:
            tokens = ["flights", "from", *a.split(), "to", *b.split()]
            words.append(" ".join(tokens))
            tags.append(" ".join(["O", "O", "B-from", *["I-from"] * (len(a.split()) - 1), "O",
                                  "B-to", *["I-to"] * (len(b.split()) - 1)]))
            labels.append("flight")
        for name, lines in (("seq.in", words), ("seq.out", tags), ("label", labels)):
            (folder / name).write_text("\n".join(lines) + "\n")


def run(command: str, cwd: Path, in_process: bool = False) -> str:
    """``$ command`` and what it printed (stdout, then stderr), paths as a user sees them.

    ``in_process``: through ``rnnkit.cli.main`` in this process (the test's quick blocks, which
    neither train nor set threads), saving a torch import per command."""
    argv = shlex.split(command)
    assert argv[0] == "rnnkit", command
    if in_process:
        from rnnkit.cli import main as rnnkit_main

        out, err, before = io.StringIO(), io.StringIO(), Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rnnkit_main(argv[1:])
        finally:
            os.chdir(before)
        printed = out.getvalue() + err.getvalue()
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
        source = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
        done = subprocess.run([sys.executable, "-m", "rnnkit", *argv[1:]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=3600)
        printed = done.stdout + done.stderr
    printed = printed.replace(str(cwd) + os.sep, "").replace(str(cwd), ".")
    printed = printed.replace(sysconfig.get_paths()["stdlib"], "/…/lib/python3")
    return f"$ {command}\n{printed}"


def transcript(block: Block, cwd: Path, in_process: bool = False) -> str:
    return "".join(run(command, cwd, in_process) for command in block.commands)


def masked(text: str) -> list[str]:
    """Lines with numbers and the sampled text masked: what a format drift changes."""
    lines, sampling = [], False
    for line in text.splitlines():
        if line.startswith("--- sample"):
            sampling = True
            continue
        if line == "---":
            sampling = False
        if not sampling:
            lines.append(re.sub(r"\d[\d,.]*", "N", line))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--slow", action="store_true", help="also the long blocks")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as directory:
        cwd = Path(directory)
        scratch(cwd)
        pieces, at = [], 0
        for block in blocks(text):
            pieces.append(text[at:block.start])
            at = block.end
            original = text[block.start:block.end]
            if block.slow and not args.slow:
                pieces.append(original)
                continue
            fresh = transcript(block, cwd)
            if args.check:
                if masked(fresh) != masked(block.body):
                    print(f"docs/cli.md: the block of `{block.commands[0]}` differs from a real "
                          f"run:\n{fresh}", file=sys.stderr)
                    return 1
                pieces.append(original)
                continue
            marker = "cli slow" if block.slow else "cli"
            pieces.append(f"<!-- {marker}: {' ;; '.join(block.commands)} -->\n```\n{fresh}```\n"
                          f"<!-- /cli -->")
        pieces.append(text[at:])
    if not args.check:
        DOC.write_text("".join(pieces), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
