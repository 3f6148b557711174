"""The explorer's analyses, server and HTML export on small trained charlm and tagger runs."""

from __future__ import annotations

import base64
import http.client
import itertools
import json
from pathlib import Path

import pytest
import torch
from explore_helpers import lstm_by_hand, train_charlm, train_tagger, write_atis

from rnnkit.cli import main
from rnnkit.explore.analysis import MAX_SYMBOLS, InputError, load_run, to_json
from rnnkit.explore.server import MAX_BODY, serve

pytest.importorskip("plotly", reason="rnnkit explore needs plotly (the explore extra)")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def charlm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return train_charlm(tmp_path_factory.mktemp("explore") / "charlm")


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("explore-tagging")
    return train_tagger(root / "run", write_atis(root / "atis"))


def test_charlm_analysis_is_the_models_own_computation(charlm_run: Path) -> None:
    explorer = load_run(charlm_run)
    text = 'he said "hi" at 10:45.\n'
    analysis = explorer.analyse(text)
    assert analysis.symbols == list(text)
    (trace,) = analysis.trace_info()
    assert [q["name"] for q in trace["quantities"]] == ["h", "c", "i", "f", "g", "o"]
    model = explorer.model
    tokens = torch.tensor(explorer.vocab.encode(text)).unsqueeze(1)
    with torch.no_grad():
        logits, (_h_n, c_n) = model(tokens)
        output, _ = model.rnn(model.embedding(tokens))
    torch.testing.assert_close(analysis.values(0, "h"), output[:, 0])
    torch.testing.assert_close(analysis.values(0, "c")[-1], c_n[0, 0])
    by_hand = lstm_by_hand(model.rnn, model.embedding(tokens)[:, 0].detach())
    for gate in "ifgo":
        torch.testing.assert_close(analysis.values(0, gate), by_hand[gate])
    probs = torch.softmax(logits[:, 0].double(), dim=-1)
    top = analysis.predictions["top_probs"]
    assert top[3][0] == pytest.approx(float(probs[3].max()), rel=1e-6)
    nxt = explorer.vocab.encode(text[4])[0]
    assert analysis.predictions["actual_next"][3] == pytest.approx(float(probs[3, nxt]))
    assert analysis.predictions["actual_next"][-1] is None


def test_charlm_bad_inputs_are_one_clear_message(charlm_run: Path) -> None:
    explorer = load_run(charlm_run)
    with pytest.raises(InputError, match="not in the model's vocabulary"):
        explorer.analyse("Zebra ☃")
    with pytest.raises(InputError, match="empty"):
        explorer.analyse("")
    with pytest.raises(InputError, match="at most 20,000"):
        explorer.analyse("a" * (MAX_SYMBOLS + 1))
    assert explorer.default_input()  # the run's validation text


def test_tagger_marginals_match_enumeration(tagger_run: Path) -> None:
    """CRF marginals against brute force over every tag sequence of a 3-word sentence."""
    explorer = load_run(tagger_run)
    analysis = explorer.analyse("flights from boston")
    p = analysis.predictions
    assert p["kind"] == "tags" and len(p["decoded"]) == 3
    model = explorer.model
    tokens = torch.tensor([[explorer.vocab.words.index[w]] for w in ("flights", "from", "boston")])
    with torch.no_grad():
        out = model(tokens, torch.tensor([3]))
    emissions, crf = out.emissions[:, 0].double(), model.crf
    start, end, trans = (p.detach().double() for p in (crf.start, crf.end, crf.transitions))
    tags = emissions.shape[1]
    weights = torch.zeros(3, tags, dtype=torch.float64)
    total = 0.0
    for path in itertools.product(range(tags), repeat=3):
        score = start[path[0]] + end[path[-1]] + sum(emissions[t, k] for t, k in enumerate(path))
        score = score + sum(trans[a, b] for a, b in itertools.pairwise(path))
        w = float(score.exp())
        total += w
        for t, k in enumerate(path):
            weights[t, k] += w
    torch.testing.assert_close(torch.tensor(p["probabilities"], dtype=torch.float64),
                               weights / total, rtol=1e-5, atol=1e-6)
    assert len(p["intent_probabilities"]) == len(p["intents"])
    # the bidirectional layer: forward and reverse traces, their h the layer's output halves
    names = [t["name"] for t in analysis.trace_info()]
    assert names == ["rnn layer 0 forward", "rnn layer 0 reverse"]
    with torch.no_grad():
        output, _ = model.rnn(model.embedding(tokens))
    hidden = model.config.recurrent.hidden
    torch.testing.assert_close(analysis.values(1, "h"), output[:, 0, hidden:])


def _request(server, method: str, path: str, body: bytes | None = None,
             host: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    headers = {"Host": host} if host else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def test_server_answers_local_requests_only_and_reports_bad_input(charlm_run: Path) -> None:
    server = serve(load_run(charlm_run))
    try:
        status, page = _request(server, "GET", "/")
        assert status == 200 and b'src="plotly.min.js"' in page and b"https://" not in page
        assert _request(server, "GET", "/plotly.min.js")[0] == 200
        status, body = _request(server, "GET", "/", host="evil.example:80")
        assert status == 403 and b"only local requests" in body
        status, body = _request(server, "POST", "/api/analyse", json.dumps({"input": "said hi"}).encode())
        assert status == 200
        summary = json.loads(body)
        assert summary["symbols"] == list("said hi")
        status, raw = _request(server, "GET", f"/api/values/{summary['id']}/0/f")
        expected = load_run(charlm_run).analyse("said hi").values(0, "f")
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).view(7, -1),
                           expected)
        for body, message in ((b"not json", "must be JSON"),
                              (json.dumps({"input": "Zebra"}).encode(), "vocabulary")):
            status, answer = _request(server, "POST", "/api/analyse", body)
            error = json.loads(answer)["error"]
            assert status in (400, 413) and message in error and "Traceback" not in error
        # too big: refused from the declared length, before the body is read
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        connection.putrequest("POST", "/api/analyse")
        connection.putheader("Content-Length", str(MAX_BODY + 1))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "at most" in json.loads(response.read())["error"]
        status, answer = _request(server, "GET", "/api/values/999/0/h")
        assert status == 404 and "gone" in json.loads(answer)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_html_export_is_self_contained(charlm_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "explore.html"
    assert main(["explore", str(charlm_run), "--html", str(out), "--text", "he said\n"]) == 0
    assert "works offline" in capsys.readouterr().out
    html = out.read_text(encoding="utf-8")
    assert "<script src=" not in html and "Plotly" in html
    settings = html.split("window.RNNKIT = ", 1)[1].split(";</script>", 1)[0]
    embedded = json.loads(settings.replace("<\\/", "</"))["embedded"]
    values = torch.frombuffer(bytearray(base64.b64decode(embedded["values"]["0/h"])),
                              dtype=torch.float32)
    expected = load_run(charlm_run).analyse("he said\n").values(0, "h")
    assert torch.equal(values.view(8, -1), expected)


def test_cli_errors_are_one_line(charlm_run: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
            (["explore", str(tmp_path / "nothing")], "no checkpoint at"),
            (["explore", str(charlm_run), "--html", str(tmp_path / "x.html"), "--text", "☃"],
             "not in the model's vocabulary"),
            (["explore", str(charlm_run), "--text", "hi"], "--html")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_explore_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["explore", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rnnkit explore" in out and "--html" in out


def test_nan_propagates_as_in_the_layer(charlm_run: Path) -> None:
    """A NaN weight: the recorded values are NaN exactly where the layer's own outputs are, and
    the JSON the page reads stays valid (NaN → null)."""
    explorer = load_run(charlm_run)
    with torch.no_grad():
        explorer.model.rnn.weight_hh_l0[3, 2] = float("nan")  # input gate of unit 3 reads h[2]
    text = "he said hi\n"
    analysis = explorer.analyse(text)
    tokens = torch.tensor(explorer.vocab.encode(text)).unsqueeze(1)
    with torch.no_grad():
        output, _ = explorer.model.rnn(explorer.model.embedding(tokens))
    recorded = analysis.values(0, "h")
    assert torch.equal(recorded.isnan(), output[:, 0].isnan()) and recorded.isnan().any()
    torch.testing.assert_close(recorded, output[:, 0], equal_nan=True)
    summary = json.loads(to_json(analysis.summary()))  # strict JSON: would raise on NaN
    assert summary["predictions"]["actual_next"][5] is None


def test_a_recording_too_big_for_memory_is_refused(charlm_run: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import rnnkit.explore.analysis as analysis

    explorer = load_run(charlm_run)
    hidden = explorer.model.rnn.hidden_size
    needed = 11 * hidden * 6 * 4  # 11 steps, 6 quantities of float32
    monkeypatch.setattr(analysis, "MAX_RECORDED_BYTES", needed - 1)
    with pytest.raises(InputError, match="shorter input"):
        explorer.analyse("he said hi\n")
    monkeypatch.setattr(analysis, "MAX_RECORDED_BYTES", needed)
    explorer.analyse("he said hi\n")


def test_a_saved_page_too_big_is_refused(charlm_run: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import rnnkit.explore.server as server

    monkeypatch.setattr(server, "MAX_HTML_VALUES", 1000)
    assert main(["explore", str(charlm_run), "--html", str(tmp_path / "big.html"),
                 "--text", "he said hi\n"]) == 2
    assert "give a shorter --text" in capsys.readouterr().err
    assert not (tmp_path / "big.html").exists()
