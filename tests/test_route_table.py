"""The plain LSTM's measured route table (``rnnkit.engine.fused.route_table``): the lookup
(nearest grid point in log space), the fallbacks to the built-in rules (no table for the ISA,
none for the thread count, a corrupt file: one warning), the shipped tables' format, and that
both forced paths compute what torch.nn does. Not timing tests: the tables' times come from
benchmarks/routing.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused
from rnnkit.engine.fused import route_table

pytestmark = pytest.mark.usefixtures("one_thread")


def table_text(points: dict[str, dict[str, float]], threads: str = "1", isa: str = "avx2",
               modes: tuple[str, ...] = route_table.MODES) -> str:
    """A routing table file with ``points`` ("T,B,H" -> {"ratio": r}) in every mode of
    ``modes`` at ``threads``."""
    entry = {mode: points for mode in modes}
    entry["machine"] = {"cpu": "test"}
    return json.dumps({"format": route_table.FORMAT, "isa": isa, "threads": {threads: entry}})


def test_the_nearest_point_in_log_space_decides() -> None:
    table = route_table.parse(table_text({"10,4,64": {"ratio": 0.5}, "100,32,256": {"ratio": 1.5},
                                          "100,4,64": {"ratio": 1.2}}))
    assert table.own_faster(10, 4, 64, 1, inference=True)  # a grid point: its own ratio
    assert not table.own_faster(100, 32, 256, 1, inference=False)
    assert table.own_faster(12, 5, 70, 1, inference=True)
    assert not table.own_faster(90, 30, 250, 1, inference=True)
    # log space: 30 steps is nearer 10 than 100 (ln 3 < ln 10/3), 35 nearer 100
    assert table.own_faster(30, 4, 64, 1, inference=True)
    assert not table.own_faster(35, 4, 64, 1, inference=True)
    # past the grid's ends: the nearest end point
    assert not table.own_faster(5000, 512, 2048, 1, inference=True)
    assert table.own_faster(1, 1, 8, 1, inference=True)
    # deterministic: asked again (from the memo) and by a fresh table, the same answer
    again = route_table.parse(table_text({"100,4,64": {"ratio": 1.2}, "10,4,64": {"ratio": 0.5},
                                          "100,32,256": {"ratio": 1.5}}))
    for shape in [(12, 5, 70), (30, 4, 64), (35, 4, 64), (31, 4, 64), (32, 4, 64)]:
        assert table.own_faster(*shape, 1, True) == again.own_faster(*shape, 1, True)


def test_a_tie_goes_to_the_smaller_point() -> None:
    # batch 2 is ln 2 from both 1 and 4: the smaller point, 1, decides (either order in the file)
    for points in ({"10,1,64": {"ratio": 0.5}, "10,4,64": {"ratio": 2.0}},
                   {"10,4,64": {"ratio": 2.0}, "10,1,64": {"ratio": 0.5}}):
        assert route_table.parse(table_text(points)).own_faster(10, 2, 64, 1, inference=True)


def test_modes_are_separate_tables() -> None:
    text = json.dumps({"format": 1, "isa": "avx2", "threads": {"1": {
        "inference": {"10,4,64": {"ratio": 0.5}}, "training": {"10,4,64": {"ratio": 1.5}}}}})
    table = route_table.parse(text)
    assert table.own_faster(10, 4, 64, 1, inference=True)
    assert not table.own_faster(10, 4, 64, 1, inference=False)


def test_the_dispatcher_follows_the_table_and_keeps_the_built_in_rules_elsewhere() -> None:
    # torch's op everywhere at 1 thread: where the built-in rules send the plain LSTM to
    # rnnkit's kernel (inference <= 50 steps; a batch-1 forward) the table now wins
    torch_everywhere = route_table.parse(table_text({"35,20,200": {"ratio": 2.0}}))
    with route_table.using(None):
        assert fused.own_kernel_faster(35, 20, 200, threads=1, inference=True)
        assert fused.own_kernel_faster(200, 1, 64, threads=2)
    with route_table.using(torch_everywhere):
        assert not fused.own_kernel_faster(35, 20, 200, threads=1, inference=True)
        assert not fused.own_kernel_faster(100, 1, 256, threads=1, inference=True)
        assert not fused.own_kernel_faster(1, 1, 256, threads=1)
        # no entry for 2 threads: the built-in rule (batch <= 4, H <= 128 with 2+ threads)
        assert fused.own_kernel_faster(200, 1, 64, threads=2)
        assert not fused.own_kernel_faster(35, 20, 200, threads=2)
        # a W_hh computed in the forward is not in the table: its rule stands
        assert fused.own_kernel_faster(200, 1, 64, threads=1, dropped_weight=True)
        # and native_op follows (torch's thread count, 1 here)
        x = torch.zeros(35, 20, 200)
        with torch.no_grad():
            assert fused.native_op(CellSpec("lstm"), x, 200) is not None
    own_everywhere = route_table.parse(table_text({"35,20,200": {"ratio": 0.5}}))
    with route_table.using(own_everywhere):
        assert fused.own_kernel_faster(100, 64, 512, threads=1)
        assert fused.native_op(CellSpec("lstm"), torch.zeros(100, 64, 512), 512) is None


def test_no_table_for_the_isa_means_the_built_in_rules_silently(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert route_table._load("avx2", tmp_path) is None


def test_the_isa_key_names_torchs_capability() -> None:
    key = route_table.isa_key()
    assert key == key.lower()
    assert key.removesuffix("_bf16") == torch.backends.cpu.get_cpu_capability().lower()


@pytest.mark.parametrize("text", [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"format": 99, "isa": "avx2", "threads": {}}),
    table_text({"35,20,200": {"ratio": -1.0}}),
    table_text({"35,20,200": {"ratio": "fast"}}),
    table_text({"35,20": {"ratio": 0.5}}),
    table_text({"35,20,200": {"ratio": 0.5}}, threads="two"),
    table_text({"35,20,200": {"ratio": 0.5}}, isa="avx512"),  # another ISA's file renamed
    b"\xff\xfe{}",  # not UTF-8: read_text's UnicodeDecodeError
], ids=["json", "list", "format", "negative", "string", "shape", "threads", "isa", "bytes"])
def test_a_corrupt_table_warns_once_and_the_built_in_rules_apply(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | bytes) -> None:
    if isinstance(text, bytes):
        (tmp_path / "avx2.json").write_bytes(text)
    else:
        (tmp_path / "avx2.json").write_text(text)
    monkeypatch.setattr(route_table, "ROUTES_DIR", tmp_path)
    monkeypatch.setattr(route_table, "isa_key", lambda: "avx2")
    monkeypatch.setattr(route_table, "_active", route_table._UNSET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fused.own_kernel_faster(35, 20, 200, threads=1, inference=True)
        second = fused.own_kernel_faster(35, 20, 200, threads=1, inference=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "ignoring the routing table" in messages[0] and "avx2.json" in messages[0]
    assert "\n" not in messages[0]
    with route_table.using(None):
        assert first == second == fused.own_kernel_faster(35, 20, 200, threads=1, inference=True)


def test_a_layer_runs_with_a_corrupt_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "avx2.json").write_text("{not json")
    monkeypatch.setattr(route_table, "ROUTES_DIR", tmp_path)
    monkeypatch.setattr(route_table, "isa_key", lambda: "avx2")
    monkeypatch.setattr(route_table, "_active", route_table._UNSET)
    layer = rnnkit.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.warns(RuntimeWarning, match="ignoring the routing table"):
        out, _ = layer(x)
    torch.testing.assert_close(out, layer.to_torch()(x)[0])


@pytest.mark.parametrize("path", sorted(route_table.ROUTES_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_the_shipped_tables_are_readable_and_complete(path: Path) -> None:
    table = route_table.parse(path.read_text(encoding="utf-8"))
    assert table.isa == path.stem
    assert (1, "inference") in table.points and (1, "training") in table.points
    data = json.loads(path.read_text(encoding="utf-8"))
    for entry in data["threads"].values():
        assert {"command", "cpu", "date", "isa", "load_average", "torch"} <= set(entry["machine"])
    # the dispatcher, asked at a grid point of this CPU's table, takes that point's route
    if path.stem == route_table.isa_key():
        for (threads, mode), points in table.points.items():
            for steps, batch, hidden, ratio in points:
                assert route_table.own_faster(steps, batch, hidden, threads,
                                              mode == "inference") == (ratio < 1.0)


def test_an_unknown_forced_path_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown path 'fast'"), fused.plain_lstm_path("fast"):
        pass


@pytest.mark.skipif(fused._build.load() is None, reason="fused backend unavailable")
@pytest.mark.parametrize("inference", [True, False], ids=["inference", "training"])
def test_both_forced_paths_equal_torch_nn(monkeypatch: pytest.MonkeyPatch, inference: bool) -> None:
    torch.manual_seed(3)
    theirs = torch.nn.LSTM(6, 16, num_layers=2)
    x = torch.randn(12, 5, 6)
    want = theirs(x.requires_grad_(not inference))
    want_grads = [] if inference else torch.autograd.grad(want[0].sum(), [x, *theirs.parameters()])
    real = torch._VF.lstm
    torch_ran: list[int] = []
    for path in fused.PATHS:
        ours = rnnkit.LSTM.from_torch(theirs)
        torch_ran.clear()
        monkeypatch.setattr(torch._VF, "lstm", lambda *a: torch_ran.append(1) or real(*a))
        with fused.plain_lstm_path(path):
            if inference:
                with torch.inference_mode():
                    got = ours(x.detach())
            else:
                got = ours(x)
                got_grads = torch.autograd.grad(got[0].sum(), [x, *ours.parameters()])
                for g, w in zip(got_grads, want_grads):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()
        assert bool(torch_ran) == (path == "torch")  # (the forced path ran)
        for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
