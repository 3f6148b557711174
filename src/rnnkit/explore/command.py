"""``rnnkit explore RUN [--port N] [--html FILE] [--text TEXT | --input FILE]``.

Kept apart from :mod:`rnnkit.cli`, which only registers it: the explorer's options live here.
"""

from __future__ import annotations

import argparse
import base64
import threading
from pathlib import Path
from typing import Any


def add_command(commands: Any) -> None:
    """Registers the ``explore`` subcommand on the CLI's subparsers."""
    explore = commands.add_parser(
        "explore", help="a web page to watch a trained network think (gates, cell states)",
        description="Serve a local page (127.0.0.1 only) that runs a trained model on your input "
                    "and shows each layer's h, c and gates, unit by unit, with the task's "
                    "predictions; or write one self-contained offline HTML file with --html.")
    explore.add_argument("run", help="run directory or its checkpoint.json")
    explore.add_argument("--port", type=int, default=8765, help="local port (0: any free one)")
    explore.add_argument("--html", metavar="FILE", default=None,
                         help="write one self-contained HTML file instead of serving")
    explore.add_argument("--text", default=None,
                         help="with --html: the input to show (default: a validation example)")
    explore.add_argument("--input", metavar="FILE", default=None,
                         help="with --html: a UTF-8 file holding the input to show (speech: "
                              "a WAV file)")
    explore.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    from rnnkit.explore.analysis import load_run
    from rnnkit.explore.server import plotly_js, serve, write_html

    if args.text is not None and args.input is not None:
        raise ValueError("give either --text or --input, not both")
    if not args.html and (args.text is not None or args.input is not None):
        raise ValueError("--text and --input choose what --html writes; the served page has "
                         "its own input box")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0…65535, got {args.port}")
    plotly_js()  # no plotly: say so now, not on the first page load
    explorer = load_run(args.run)
    if args.html:
        text = _input(explorer.input_kind, args) if args.input is not None or (
            args.text is not None) else explorer.default_input()
        path = write_html(explorer, text, args.html)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, works offline)")
        return 0
    try:
        server = serve(explorer, port=args.port)
    except OSError as error:
        raise ValueError(f"cannot listen on 127.0.0.1:{args.port}: {error.strerror}") from None
    print(f"rnnkit explore: {server.url}  (Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()  # the server runs in its thread until Ctrl-C
    finally:
        server.shutdown()
    return 0


def _input(kind: str, args: argparse.Namespace) -> str:
    """What ``--text`` / ``--input`` give, in the explorer's form (a WAV as base64)."""
    if kind == "wav":
        if args.input is None:
            raise ValueError("a speech model listens: give a WAV file with --input, not --text")
        return base64.b64encode(Path(args.input).read_bytes()).decode()
    if args.input is None:
        return args.text
    try:
        return Path(args.input).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{args.input} is not UTF-8 text") from None
