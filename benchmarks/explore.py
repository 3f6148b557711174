"""How responsive `rnnkit explore` is on a long input, in a real (headless Chromium) browser.

Serves RUN, types an input of ``--symbols`` symbols (the run's validation text repeated), and
times the model run + first draw, the next window, switching to a gate and sorting units by
variance; ``--screenshot FILE`` saves the page after choosing ``--quantity`` / ``--unit`` /
``--sort`` (how docs/explore-charlm.png was made). Needs chromium, chromium-driver, selenium::

    python benchmarks/explore.py runs/charlm-small --symbols 20000
    python benchmarks/explore.py runs/charlm-small --symbols 1200 --quantity c --sort correlation \\
        --pattern quotes --screenshot docs/explore-charlm.png
    python benchmarks/explore.py runs/sst-treelstm --text "$(sed -n 3p ../shared/data/sst-trees/dev.txt)" \\
        --quantity c --tree-colour sentiment --scroll-to task-section --screenshot docs/explore-trees.png
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

import torch

from rnnkit.explore.analysis import load_run
from rnnkit.explore.server import serve


def _renders(driver: Any) -> int:
    return int(driver.execute_script("return document.body.dataset.renders || 0"))


def _timed(driver: Any, script: str, *args: Any) -> float:
    before = _renders(driver)
    start = time.perf_counter()
    driver.execute_script(script, *args)
    while _renders(driver) <= before:
        time.sleep(0.02)
    return time.perf_counter() - start


def _select(element: str, value: str) -> str:
    return (f"const e = document.getElementById('{element}'); e.value = '{value}'; "
            "e.dispatchEvent(new Event('change'))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--symbols", type=int, default=20_000)
    parser.add_argument("--quantity", default="f")
    parser.add_argument("--unit", type=int, default=None, help="default: the top unit after sorting")
    parser.add_argument("--sort", default="variance", choices=("index", "variance", "correlation"))
    parser.add_argument("--pattern", default="position", choices=("position", "quotes", "regex"))
    parser.add_argument("--text", default=None, help="the input as is (default: the run's "
                                                     "validation input repeated to --symbols)")
    parser.add_argument("--tree-colour", default=None, choices=("unit", "sentiment"),
                        help="trees: colour the parse tree's nodes by the unit or the prediction")
    parser.add_argument("--scroll-to", default=None, metavar="ID",
                        help="scroll the page to this element before the screenshot "
                             "(e.g. task-section: the task's own charts)")
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    explorer = load_run(args.run)
    base = explorer.default_input()
    text = args.text if args.text is not None else (
        base * (args.symbols // max(1, len(base)) + 1))[: args.symbols]
    start = time.perf_counter()
    explorer.analyse(text)
    print(f"analyse {len(text):,} symbols in Python: {time.perf_counter() - start:.1f} s")

    server = serve(explorer)
    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1300,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options,
                              service=Service(shutil.which("chromedriver") or "chromedriver"))
    try:
        driver.get(server.url)
        while _renders(driver) == 0:
            time.sleep(0.1)
        seconds = _timed(driver, "document.getElementById('input').value = arguments[0]; "
                                 "document.getElementById('run-input').click()", text)
        spans = driver.execute_script("return document.querySelectorAll('#text .sym').length")
        print(f"page: model run + first draw {seconds:.1f} s ({spans} symbols in the DOM)")
        for name in ("next", "prev"):
            seconds = _timed(driver, f"document.getElementById('{name}').click()")
            print(f"{name} window: {seconds:.2f} s")
        print(f"show {args.quantity}: {_timed(driver, _select('quantity', args.quantity)):.2f} s")
        # the pattern is read when sorting by correlation, just below
        driver.execute_script("document.getElementById('pattern').value = arguments[0]",
                              args.pattern)
        print(f"sort by {args.sort}: {_timed(driver, _select('sort', args.sort)):.2f} s")
        unit = args.unit
        if unit is None:
            info = driver.find_element("id", "sort-info").text  # "top unit N: ..."
            unit = int(info.split()[2].rstrip(":")) if info else 0
        print(f"unit {unit}: {_timed(driver, _select('unit', str(unit))):.2f} s")
        if args.tree_colour:
            print(f"tree coloured by {args.tree_colour}: "
                  f"{_timed(driver, _select('tree-colour', args.tree_colour)):.2f} s")
        if args.screenshot:
            if args.scroll_to:
                driver.execute_script("document.getElementById(arguments[0]).scrollIntoView()",
                                      args.scroll_to)
            driver.save_screenshot(args.screenshot)
            print(f"screenshot: {args.screenshot}")
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
