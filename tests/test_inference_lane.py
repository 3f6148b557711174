"""The lean path's lane (``fused/inference.py`` ``_Lane``): a one-layer layer's repeated call
without ``hx`` and ``lengths`` runs the operator with the arguments its last call resolved. It
must give exactly what the full lean path gives, and stop being used the moment anything those
arguments came from changes (the weights, ``batch_first``, the input's shape)."""

from __future__ import annotations

import pytest
import torch

from conftest import LAYER_FACTORIES as LAYERS
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused
from rnnkit.engine.fused import inference as lean_inference

pytestmark = [
    pytest.mark.skipif(fused.unavailable_reason(CellSpec("gru"), torch.float32, "cpu") is not None,
                       reason="the fused C++ kernels are unavailable"),
    pytest.mark.usefixtures("rnnkit_kernel_only"),
]

INPUT, HIDDEN = 11, 24


def _flat(result: tuple[torch.Tensor, object]) -> list[torch.Tensor]:
    state = result[1]
    return [result[0], *(state if isinstance(state, tuple) else (state,))]


def _full_path(layer: torch.nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
               ) -> list[torch.Tensor]:
    with monkeypatch.context() as patch, torch.inference_mode():
        patch.setattr(lean_inference, "LANES", False)
        return _flat(layer(x))


def _no_full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every operator lookup of the full lean path raises: only the lane can run."""
    def refuse() -> None:
        raise AssertionError("the full lean path ran")

    monkeypatch.setattr(lean_inference, "_ops", refuse)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("shape", [(6, 1), (6, 5)])  # (steps, batch): forward_packed, layer_forward_packed
@pytest.mark.parametrize("batch_first", [False, True])
def test_lane_equals_the_full_path(name, shape, batch_first, monkeypatch):
    torch.manual_seed(0)
    layer = LAYERS[name](INPUT, HIDDEN, batch_first=batch_first).eval()
    steps, batch = shape
    x = torch.randn((batch, steps, INPUT) if batch_first else (steps, batch, INPUT))
    full = _full_path(layer, x, monkeypatch)
    with torch.inference_mode():
        first = _flat(layer(x))  # (makes the lane)
        assert lean_inference._LANE in layer.__dict__
        with monkeypatch.context() as patch:
            _no_full_path(patch)
            again = _flat(layer(x))
    for a, b, c in zip(full, first, again, strict=True):
        assert a.shape == b.shape == c.shape
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lstm", "gru_after", "rnn_tanh"])
def test_lane_follows_the_weights(name, monkeypatch):
    """An in-place weight change rebuilds the plan, and the lane with it."""
    torch.manual_seed(0)
    layer = LAYERS[name](INPUT, HIDDEN).eval()
    x = torch.randn(5, 4, INPUT)
    with torch.inference_mode():
        layer(x)
        before = _flat(layer(x))
    with torch.no_grad():
        layer.weight_hh_l0.mul_(-0.5)
    with torch.inference_mode():
        after = _flat(layer(x))
    want = _full_path(layer, x, monkeypatch)
    for a, b in zip(after, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(before[0], after[0])


def _lstm_with_a_lane() -> tuple[torch.nn.Module, torch.Tensor]:
    """A plain LSTM that has run once (so it has a lane) and its input."""
    torch.manual_seed(0)
    layer = LAYERS["lstm"](INPUT, HIDDEN).eval()
    x = torch.randn(5, 4, INPUT)
    with torch.inference_mode():
        layer(x)
    return layer, x


def test_lane_not_taken_for_another_shape_or_layout(monkeypatch):
    layer, x = _lstm_with_a_lane()
    with torch.inference_mode(), monkeypatch.context() as patch:
        _no_full_path(patch)
        with pytest.raises(AssertionError, match="full lean path"):
            layer(torch.randn(5, 3, INPUT))  # another batch
        layer.batch_first = True  # the same shape read as (B, T, I)
        with pytest.raises(AssertionError, match="full lean path"):
            layer(x)
    want = _full_path(layer, x, monkeypatch)
    with torch.inference_mode():
        got = _flat(layer(x))
    assert got[0].shape == (5, 4, HIDDEN)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lane_asks_the_route_again_when_it_may_have_changed(monkeypatch):
    """A plain LSTM's lane keeps the route it was made on: forcing torch's op (or any other
    change own_kernel_faster depends on) sends the call back to the full path, which routes it."""
    layer, x = _lstm_with_a_lane()
    with torch.inference_mode(), monkeypatch.context() as patch:
        _no_full_path(patch)
        layer(x)  # (the lane)
        with fused.plain_lstm_path("torch"), pytest.raises(AssertionError,
                                                           match="full lean path"):
            layer(x)
        patch.setattr(fused, "use_native", True)
        with pytest.raises(AssertionError, match="full lean path"):
            layer(x)


def test_a_layer_with_a_lane_pickles_and_loads_with_weights_only(tmp_path):
    """The lane holds the operator (a pybind11 object, not picklable): after one inference call
    ``torch.save(layer)`` raised 'is not pickleable' (review, session 15). It is a cache, dropped
    from the pickle like the plan, and rebuilt on the next call."""
    import rnnkit
    torch.manual_seed(0)
    layer = rnnkit.GRU(INPUT, HIDDEN).eval()
    x = torch.randn(7, 3, INPUT)
    with torch.inference_mode():
        want = layer(x)[0]
        layer(x)
    assert "_inference_lane" in layer.__dict__
    path = tmp_path / "gru.pt"
    torch.save(layer, path)
    with torch.serialization.safe_globals([rnnkit.GRU]):
        loaded = torch.load(path, weights_only=True)
    assert "_inference_lane" not in loaded.__dict__
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x)[0], want, rtol=0, atol=0)


def test_lanes_off_makes_no_lane(monkeypatch):
    layer = LAYERS["gru_after"](INPUT, HIDDEN).eval()
    monkeypatch.setattr(lean_inference, "LANES", False)
    with torch.inference_mode():
        layer(torch.randn(5, 2, INPUT))
    assert "_inference_lane" not in layer.__dict__
