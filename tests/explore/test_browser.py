"""A real browser (headless Chromium through selenium) drives the explorer page.

It types an input, picks a layer/direction, a gate and a unit, and checks that the value behind
each coloured symbol equals the model's own activation for that input. Screenshots go to
``$RNNKIT_SCREENSHOT_DIR`` (CI keeps them as artefacts; ``docs/`` for the README) or the test's
temporary folder. Skipped, saying why, where Chromium or its driver is not installed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from explore_helpers import (
    TEXT,
    lstm_by_hand,
    train_adding,
    train_charlm,
    train_copymemory,
    train_speech,
    train_tagger,
    train_trees,
    write_atis,
)

from rnnkit.explore.analysis import load_run
from rnnkit.explore.server import serve, write_html
from rnnkit.models.acoustic import stack_frames

pytest.importorskip("plotly", reason="rnnkit explore needs plotly (the explore extra)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")


def _binary(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = _binary("chromium", "chromium-browser", "google-chrome")
    driver_path = _binary("chromedriver", "chromium-driver")
    if chromium is None or driver_path is None:
        pytest.skip("needs Chromium and its driver (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1300,1400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("RNNKIT_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait_for_render(driver: Any, after: int, timeout: float = 120) -> int:
    """Waits until the page has drawn more often than ``after`` times; fails on a shown error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        renders = int(driver.execute_script("return document.body.dataset.renders || 0"))
        if renders > after:
            return renders
        time.sleep(0.1)
    message = driver.find_element("id", "message").text
    raise AssertionError(f"the page did not draw within {timeout} s; message: {message!r}")


def _choose(driver: Any, element_id: str, value: str, renders: int) -> int:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", element_id)).select_by_value(value)
    return _wait_for_render(driver, renders)


def _set_unit(driver: Any, unit: int, renders: int) -> int:
    field = driver.find_element("id", "unit")
    field.clear()
    field.send_keys(str(unit))
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    return _wait_for_render(driver, renders)


def _type_and_run(driver: Any, text: str, renders: int) -> int:
    box = driver.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "run-input").click()
    return _wait_for_render(driver, renders)


def _shown(driver: Any) -> tuple[list[str], torch.Tensor]:
    pairs = driver.execute_script(
        "return [...document.querySelectorAll('#text .sym')].map("
        "s => [s.firstChild.textContent, s.dataset.value])")
    return [p[0] for p in pairs], torch.tensor([float(p[1]) for p in pairs])


def test_charlm_page_shows_the_models_activations(browser: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    run = train_charlm(tmp_path / "charlm")
    explorer = load_run(run)
    server = serve(explorer)
    try:
        browser.get(server.url)
        renders = _wait_for_render(browser, 0)  # the validation example by default
        text = 'he said "hello" at 10:45.\nthen "bye".\n'
        renders = _type_and_run(browser, text, renders)
        renders = _choose(browser, "quantity", "f", renders)
        renders = _set_unit(browser, 5, renders)
        symbols, values = _shown(browser)
        assert "".join(s.replace("↵\n", "\n") for s in symbols) == text
        model = explorer.model
        tokens = torch.tensor(explorer.vocab.encode(text)).unsqueeze(1)
        x = model.embedding(tokens)[:, 0].detach()
        torch.testing.assert_close(values, lstm_by_hand(model.rnn, x)["f"][:, 5])
        renders = _choose(browser, "quantity", "h", renders)
        _, values = _shown(browser)
        with torch.no_grad():
            output, _ = model.rnn(model.embedding(tokens))  # the model's own layer
        torch.testing.assert_close(values, output[:, 0, 5])
        # the saturation plot: per unit, the fractions of steps with the gate < 0.1 and > 0.9
        plotted = browser.execute_script(
            "return document.getElementById('saturation').data.map(d => [d.name, d.x, d.y])")
        by_hand = lstm_by_hand(model.rnn, x)
        assert [name for name, _, _ in plotted] == ["i gate", "f gate", "o gate"]
        for name, low, high in plotted:
            gate = by_hand[name[0]]
            torch.testing.assert_close(torch.tensor(low, dtype=torch.float64),
                                       (gate < 0.1).double().mean(0))
            torch.testing.assert_close(torch.tensor(high, dtype=torch.float64),
                                       (gate > 0.9).double().mean(0))
        # sorting: the page's top unit and score against the same statistics computed here
        h = output[:, 0].double()  # (T, H)
        renders = _choose(browser, "sort", "variance", renders)
        variance = h.var(0, unbiased=False)
        top = int(variance.argmax())
        assert browser.find_element("id", "sort-info").text == (
            f"top unit {top}: variance {float(variance[top]):.3f}")
        renders = _choose(browser, "sort", "correlation", renders)  # with position in line
        column, pattern = 0, []
        for symbol in text:
            pattern.append(float(column))
            column = 0 if symbol == "\n" else column + 1
        p = torch.tensor(pattern, dtype=torch.float64)
        corr = ((h - h.mean(0)) * (p - p.mean()).unsqueeze(1)).sum(0) / (
            (h - h.mean(0)).norm(dim=0) * (p - p.mean()).norm())
        top = int(corr.abs().argmax())
        assert browser.find_element("id", "sort-info").text == (
            f"top unit {top}: correlation {float(corr[top]):.3f}")
        heat_rows = browser.execute_script("return document.getElementById('heatmap').data[0].y")
        assert heat_rows[0] == f"unit {top}"
        # a bad input: one inline message, the page keeps working
        box = browser.find_element("id", "input")
        box.clear()
        box.send_keys("Zebra")
        browser.find_element("id", "run-input").click()
        deadline = time.monotonic() + 60
        while "vocabulary" not in browser.find_element("id", "message").text:
            assert time.monotonic() < deadline, "no inline message for an unknown symbol"
            time.sleep(0.1)
        assert "Traceback" not in browser.find_element("id", "message").text
        renders = _type_and_run(browser, text, renders)
        browser.save_screenshot(str(_screenshot_dir(tmp_path) / "browser-test-charlm.png"))
    finally:
        server.shutdown()
        server.server_close()


def test_tagger_page_shows_the_models_activations(browser: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    run = train_tagger(tmp_path / "run", write_atis(tmp_path / "atis"), crf=True)
    explorer = load_run(run)
    server = serve(explorer)
    try:
        browser.get(server.url)
        renders = _wait_for_render(browser, 0)
        sentence = "show flights from denver to boston"
        renders = _type_and_run(browser, sentence, renders)
        renders = _choose(browser, "trace", "1", renders)  # layer 0, reverse direction
        renders = _choose(browser, "quantity", "o", renders)
        renders = _set_unit(browser, 2, renders)
        symbols, values = _shown(browser)
        assert symbols == sentence.split()
        model = explorer.model
        tokens = torch.tensor([[explorer.vocab.words.index[w]] for w in sentence.split()])
        x = model.embedding(tokens)[:, 0].detach()
        torch.testing.assert_close(values, lstm_by_hand(model.rnn, x, direction=1)["o"][:, 2])
        renders = _choose(browser, "quantity", "h", renders)
        _, values = _shown(browser)
        with torch.no_grad():
            output, _ = model.rnn(model.embedding(tokens))
        hidden = model.config.recurrent.hidden
        torch.testing.assert_close(values, output[:, 0, hidden + 2])
        tags = browser.execute_script(
            "return [...document.querySelectorAll('#text .sym .tag')].map(s => s.textContent)")
        assert tags == explorer.analyse(sentence).predictions["decoded"]
        assert not browser.find_element("id", "task-section").is_displayed()  # no task charts
        browser.save_screenshot(str(_screenshot_dir(tmp_path) / "browser-test-tagging.png"))
    finally:
        server.shutdown()
        server.server_close()


def _wait_for_message(driver: Any, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while text not in (shown := driver.find_element("id", "message").text):
        assert time.monotonic() < deadline, f"no inline message with {text!r}; shown: {shown!r}"
        time.sleep(0.1)
    assert "Traceback" not in shown
    return shown


def test_speech_page_takes_a_wav_and_names_a_wrong_file(browser: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    recordings = tmp_path / "recordings"
    explorer = load_run(train_speech(tmp_path / "run", recordings))
    server = serve(explorer)
    try:
        browser.get(server.url)
        renders = _wait_for_render(browser, 0)  # a recording of the run's folder by default
        upload = browser.find_element("id", "wav")
        wav = sorted(recordings.glob("*.wav"))[7]
        upload.send_keys(str(wav))
        browser.find_element("id", "run-input").click()
        renders = _wait_for_render(browser, renders)
        renders = _set_unit(browser, 1, renders)
        _, values = _shown(browser)
        features = explorer.extractor.from_file(wav)
        stacked, lengths = stack_frames(features.unsqueeze(1), torch.tensor([features.shape[0]]),
                                        explorer.model.config.stack)
        with torch.no_grad():
            output, _ = explorer.model.encoder(stacked, lengths=lengths)
        # forward direction, unit 1; the recording replays the cell math step by step in float32,
        # the model runs the fused kernel (other GEMM blocking): a few float32 roundings apart
        torch.testing.assert_close(values, output[:, 0, 1], rtol=1e-4, atol=1e-4)
        assert "decoded" in browser.find_element("id", "prediction-text").text
        not_audio = tmp_path / "notes.wav"
        not_audio.write_text("these are notes, not audio")
        upload.send_keys(str(not_audio))
        browser.find_element("id", "run-input").click()
        shown = _wait_for_message(browser, "not a readable PCM WAV file")
        assert "the uploaded file" in shown and str(tmp_path) not in shown
        browser.save_screenshot(str(_screenshot_dir(tmp_path) / "browser-test-speech.png"))
    finally:
        server.shutdown()
        server.server_close()


def test_saved_html_page_works_from_a_file(browser: Any, tmp_path: Path) -> None:
    """The --html page opened as a file (no server, nothing fetched) shows the same values."""
    torch.manual_seed(0)
    explorer = load_run(train_charlm(tmp_path / "charlm"))
    text = 'he said "hi"\n'
    page = write_html(explorer, text, tmp_path / "page.html")
    browser.get(page.as_uri())
    renders = _wait_for_render(browser, 0)
    renders = _choose(browser, "quantity", "o", renders)
    renders = _set_unit(browser, 3, renders)
    _, values = _shown(browser)
    tokens = torch.tensor(explorer.vocab.encode(text)).unsqueeze(1)
    x = explorer.model.embedding(tokens)[:, 0].detach()
    torch.testing.assert_close(values, lstm_by_hand(explorer.model.rnn, x)["o"][:, 3])
    browser.find_element("id", "run-input").click()  # a saved page cannot run the model
    _wait_for_message(browser, "saved page")


def _chart(driver: Any, element_id: str) -> list[dict[str, Any]]:
    """The data plotly drew in one chart (empty when nothing was drawn)."""
    return driver.execute_script(
        "const d = document.getElementById(arguments[0]).data; "
        "return d ? JSON.parse(JSON.stringify(d)) : []", element_id)


def test_adding_page_shows_the_marks_and_what_the_answer_depends_on(browser: Any,
                                                                    tmp_path: Path) -> None:
    torch.manual_seed(0)
    explorer = load_run(train_adding(tmp_path / "run", length=30))
    server = serve(explorer)
    try:
        browser.get(server.url)
        renders = _wait_for_render(browser, 0)  # validation sequence 0
        renders = _type_and_run(browser, "5", renders)
        renders = _choose(browser, "quantity", "z", renders)
        renders = _set_unit(browser, 4, renders)
        symbols, values = _shown(browser)
        inputs = explorer.sequences().inputs[:, 5:6]
        marks = inputs[:, 0, 1].nonzero()[:, 0].tolist()
        assert [t for t, s in enumerate(symbols) if s.startswith("▶")] == marks
        assert [float(s.lstrip("▶")) for s in symbols] == pytest.approx(
            inputs[:, 0, 0].tolist(), abs=5e-4)
        rnn = explorer.model.rnn
        with torch.no_grad():  # the GRU's update gate, as torch.nn.GRU documents it
            x, h, gates = inputs[:, 0], torch.zeros(rnn.hidden_size), []
            for t in range(len(x)):
                r, z, n = (rnn.weight_ih_l0 @ x[t] + rnn.bias_ih_l0).chunk(3)
                hr, hz, hn = (rnn.weight_hh_l0 @ h + rnn.bias_hh_l0).chunk(3)
                r, z = (r + hr).sigmoid(), (z + hz).sigmoid()
                h = (1 - z) * (n + r * hn).tanh() + z * h
                gates.append(z[4])
        torch.testing.assert_close(values, torch.stack(gates))
        assert browser.find_element("id", "task-section").is_displayed()
        assert not browser.find_element("id", "tree-controls").is_displayed()  # trees only
        assert "What the final answer depends on" in browser.find_element("id", "task-title").text
        saliency = _chart(browser, "task-a")
        analysis = explorer.analyse("5")
        assert saliency[0]["y"] == pytest.approx(analysis.predictions["saliency_value"])
        assert saliency[1]["y"] == pytest.approx(analysis.predictions["saliency_marker"])
        carried = _chart(browser, "task-b")
        assert [line["y"] for line in carried] == [
            pytest.approx(row) for row in analysis.predictions["carried"]]
        timeline = _chart(browser, "timeline")
        assert timeline[0]["y"] == pytest.approx(analysis.predictions["prefix"])
        assert "final answer" in browser.find_element("id", "prediction-text").text
        browser.save_screenshot(str(_screenshot_dir(tmp_path) / "browser-test-adding.png"))
        _type_and_run_expecting(browser, "-1", "validation sequence")
    finally:
        server.shutdown()
        server.server_close()


def test_copymemory_page_shows_the_recall_phase(browser: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    explorer = load_run(train_copymemory(tmp_path / "run"))
    server = serve(explorer)
    try:
        browser.get(server.url)
        renders = _wait_for_render(browser, 0)
        renders = _type_and_run(browser, "8765432112", renders)
        renders = _set_unit(browser, 3, renders)
        symbols, values = _shown(browser)
        assert "".join(symbols) == "8765432112" + "_" * 14 + ":" + "_" * 10
        tokens = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 1, 2] + [0] * 14 + [9] + [0] * 10)
        model = explorer.model
        with torch.no_grad():
            output, _ = model.rnn(F.one_hot(tokens, 10).float().unsqueeze(1))
            logits, _ = model(tokens.unsqueeze(1))
        torch.testing.assert_close(values, output[:, 0, 3])
        recall = _chart(browser, "task-a")[0]
        torch.testing.assert_close(torch.tensor(recall["z"]),
                                   torch.softmax(logits[-10:, 0], -1), rtol=1e-4, atol=1e-6)
        assert recall["x"] == ["_", "1", "2", "3", "4", "5", "6", "7", "8", ":"]
        memory = _chart(browser, "task-b")[0]["z"]
        assert len(memory) == 10 and all(len(row) == 10 for row in memory)
        torch.testing.assert_close(torch.tensor(memory, dtype=torch.float64), torch.tensor(
            explorer.analyse("8765432112").predictions["memory"], dtype=torch.float64))
        held = _chart(browser, "task-c")
        assert [line["name"] for line in held] == [f"digit {j}: {d}" for j, d in enumerate("8765432112")]
        assert all(len(line["y"]) == 35 for line in held)
        assert "copied" in browser.find_element("id", "task-note").text
        browser.save_screenshot(str(_screenshot_dir(tmp_path) / "browser-test-copymemory.png"))
        _type_and_run_expecting(browser, "1239", "type the 10 digits to copy")
    finally:
        server.shutdown()
        server.server_close()


def test_trees_page_draws_the_parse_tree_with_each_nodes_state(browser: Any, tmp_path: Path) -> None:
    from rnnkit.data.trees import parse_tree
    from rnnkit.models.tree_lstm import TreeBatch
    from rnnkit.tasks.trees import relabel

    torch.manual_seed(0)
    explorer = load_run(train_trees(tmp_path / "run"))
    server = serve(explorer)
    text = "(3 (2 (2 a) (3 lovely)) (2 (2 film) (2 .)))"
    try:
        browser.get(server.url)
        renders = _wait_for_render(browser, 0)  # the first dev tree
        renders = _type_and_run(browser, text, renders)
        renders = _set_unit(browser, 2, renders)
        symbols, values = _shown(browser)
        assert symbols == ["a", "lovely", "⟨a lovely⟩", "film", ".", "⟨film .⟩", "⟨a lovely film .⟩"]
        model, vocab = explorer.model, explorer.vocab
        tree = relabel(parse_tree(text), explorer.data)
        batch = TreeBatch.build([tree], vocab.index, vocab.unk)
        order = [0, 1, 4, 2, 3, 5, 6]  # post-order node → level-by-level batch row
        with torch.no_grad():
            h, _ = model.tree(batch, model.embedding(batch.words))
            probs = torch.softmax(model(batch), -1)
        torch.testing.assert_close(values, h[order, 2])
        drawn = _chart(browser, "task-a")
        nodes = drawn[1]
        assert nodes["customdata"] == list(range(7)) and len(drawn[0]["x"]) == 6 * 3  # 6 edges
        torch.testing.assert_close(torch.tensor(nodes["marker"]["color"]), h[order, 2])
        assert nodes["x"] == [0, 1, 0.5, 2, 3, 2.5, 1.5] and nodes["y"] == [0, 0, 1, 0, 0, 1, 2]
        # the right child's forget gate: NaN (no child) at the leaves, drawn apart in grey
        renders = _choose(browser, "quantity", "f2", renders)
        _, values = _shown(browser)
        assert values[[0, 1, 3, 4]].isnan().all() and not values[[2, 5, 6]].isnan().any()
        H = model.tree.hidden_size
        with torch.no_grad():  # the root's f_2 = σ(W_f2 x + U_f2 [h_left; h_right] + b)
            pre = model.tree.w.bias + model.tree.u(torch.cat((h[4], h[5])))
        assert float(values[6]) == pytest.approx(float(pre[2 * H:3 * H].sigmoid()[2]), rel=1e-5)
        drawn = _chart(browser, "task-a")
        assert drawn[1]["customdata"] == [2, 5, 6] and drawn[2]["customdata"] == [0, 1, 3, 4]
        assert browser.find_element("id", "tree-controls").is_displayed()
        renders = _choose(browser, "tree-colour", "sentiment", renders)
        nodes = _chart(browser, "task-a")[1]
        torch.testing.assert_close(torch.tensor(nodes["marker"]["color"]), probs[order, 1])
        assert "SST label positive" in browser.find_element("id", "task-note").text
        # a click on the root node selects it: its predictions are shown
        browser.execute_script("document.getElementById('task-a').emit('plotly_click', "
                               "{points: [{customdata: 6}]})")
        renders = _wait_for_render(browser, renders)
        assert browser.find_element("id", "step").text.startswith("6 ")
        shown = browser.execute_script("return document.getElementById('predictions').data[0].x")
        assert shown == pytest.approx(probs[order[6]].tolist(), rel=1e-5)
        renders = _choose(browser, "quantity", "h", renders)
        browser.save_screenshot(str(_screenshot_dir(tmp_path) / "browser-test-trees.png"))
        _type_and_run_expecting(browser, "(3 (2 a", "does not close")
    finally:
        server.shutdown()
        server.server_close()


def _type_and_run_expecting(driver: Any, text: str, shown: str) -> None:
    """A bad input: one inline message naming the problem, no stack trace."""
    box = driver.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "run-input").click()
    _wait_for_message(driver, shown)


@pytest.mark.slow
def test_twenty_thousand_symbols_draw_one_window(browser: Any, tmp_path: Path) -> None:
    """A 20,000-symbol input: the DOM holds one window of symbols, and paging redraws it."""
    torch.manual_seed(0)
    explorer = load_run(train_charlm(tmp_path / "charlm"))
    server = serve(explorer)
    text = (TEXT * 400)[:20_000]
    try:
        browser.get(server.url)
        renders = _wait_for_render(browser, 0)
        browser.execute_script("document.getElementById('input').value = arguments[0]", text)
        browser.find_element("id", "run-input").click()
        renders = _wait_for_render(browser, renders, timeout=600)
        assert browser.execute_script("return document.querySelectorAll('#text .sym').length") == 400
        browser.find_element("id", "next").click()
        renders = _wait_for_render(browser, renders)
        first = browser.execute_script("return document.querySelector('#text .sym').dataset.t")
        assert first == "400" and "20000" in browser.find_element("id", "window-info").text
    finally:
        server.shutdown()
        server.server_close()
