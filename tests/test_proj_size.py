"""``proj_size`` (LSTMP) exactly as ``torch.nn.LSTM``, and the ``device=``/``dtype=`` factory
arguments of every layer and cell.

The oracle is ``torch.nn.LSTM`` with the same weights (copied by ``from_torch``); the
hand-derived backward of the projection (BPTT engine, and the fused backend's explicit routes)
is checked by ``gradcheck`` in float64.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.cells import CellSpec
from rnnkit.engine import fused
from rnnkit.engine.bptt import run_bptt

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference", "bptt", "fused"]
LENGTHS = torch.tensor([7, 3, 5, 1])


def _run_both(ref: nn.LSTM, layer: rnnkit.LSTM, x: torch.Tensor, packed: bool,
              hx: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Outputs, final states and the gradients of a weighted sum of all three, for both."""
    results = []
    for module in (ref, layer):
        if packed:
            data = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
            out, (h, c) = module(data, hx)
            out, _ = pad_packed_sequence(out, total_length=x.shape[0])
        else:
            out, (h, c) = module(x, hx)
        weights = [x, *module.parameters()] + ([*hx] if hx is not None else [])
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=x.dtype)).sum() + 2 * h.sum() \
            + 3 * c.sum()
        results.append((out, h, c, *torch.autograd.grad(loss, weights)))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (1, True), (2, True)])
@pytest.mark.parametrize("packed", [False, True])
def test_equals_torch_lstm_in_value_and_gradient(backend, layers, bidirectional, packed):
    ref = nn.LSTM(5, 8, num_layers=layers, bidirectional=bidirectional, proj_size=3).double()
    layer = rnnkit.LSTM.from_torch(ref, backend=backend)
    depth = layers * (2 if bidirectional else 1)
    x = torch.randn(7, 4, 5, dtype=torch.double, requires_grad=True)
    hx = (torch.randn(depth, 4, 3, dtype=torch.double, requires_grad=True),
          torch.randn(depth, 4, 8, dtype=torch.double, requires_grad=True))
    want, got = _run_both(ref, layer, x, packed, hx)
    assert got[0].shape == (7, 4, 3 * (2 if bidirectional else 1))
    assert got[1].shape == (depth, 4, 3) and got[2].shape == (depth, 4, 8)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", [{}, {"peephole": True}])
def test_ragged_batch_in_chunks_equals_torch_packed(options, monkeypatch):
    """The fused backend runs a ragged projected LSTM as BPTT chunks (not torch's packed op,
    2-3x slower): every change of batch size a chunk of its own here."""
    monkeypatch.setattr(fused, "CHUNK_ROWS", 0)
    monkeypatch.setattr(fused, "CHUNK_WEIGHTS", 0.0)

    def packed_op(*args):
        raise AssertionError("a ragged batch reached torch's packed op")

    monkeypatch.setattr(fused, "_run_vf_lstm", packed_op)
    ref = nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3).double()
    layer = rnnkit.LSTM.from_torch(ref, backend="fused")
    x = torch.randn(7, 4, 5, dtype=torch.double, requires_grad=True)
    want, got = _run_both(ref, layer, x, packed=True)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    if options:  # (no torch.nn twin: against the reference engine)
        twin = rnnkit.LSTM(5, 8, proj_size=3, backend="reference", **options).double()
        chunked = rnnkit.LSTM(5, 8, proj_size=3, backend="fused", **options).double()
        chunked.load_state_dict(twin.state_dict())
        for a, b in zip(twin(x, lengths=LENGTHS), chunked(x, lengths=LENGTHS)):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_equal_torch_packed(backend):
    """``lengths=`` is the same computation as torch's PackedSequence (batch_first too)."""
    ref = nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=2, batch_first=True).double()
    layer = rnnkit.LSTM.from_torch(ref, backend=backend)
    x = torch.randn(4, 7, 5, dtype=torch.double)
    out_ref, (h_ref, c_ref) = ref(pack_padded_sequence(x, LENGTHS, batch_first=True,
                                                       enforce_sorted=False))
    out_ref, _ = pad_packed_sequence(out_ref, batch_first=True, total_length=7)
    out, (h, c) = layer(x, lengths=LENGTHS)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-10)


def test_parameters_states_and_conversion_are_torch_s():
    ref = nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, bias=False)
    layer = rnnkit.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, bias=False)
    assert [(n, p.shape) for n, p in layer.named_parameters()] == \
        [(n, p.shape) for n, p in ref.named_parameters()]
    assert layer.weight_hr_l1_reverse.shape == (3, 8) and layer.weight_hh_l0.shape == (32, 3)
    assert layer.weight_ih_l1.shape == (32, 6) and layer.proj_size == 3
    back = rnnkit.LSTM.from_torch(ref).to_torch()
    assert isinstance(back, nn.LSTM) and back.proj_size == 3
    for (name, a), (_, b) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(6, 2, 5)
    torch.testing.assert_close(back(x)[0], ref(x)[0], rtol=0, atol=0)
    assert "proj_size=3" in repr(layer)


@pytest.mark.parametrize("options", [{"peephole": True}, {"coupled": True},
                                     {"peephole": True, "coupled": True}])
def test_combines_with_peephole_and_coupled(options):
    """The recurrent input is the projected h; fused (its explicit BPTT route) = reference."""
    torch.manual_seed(1)
    layers = {b: rnnkit.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2, backend=b,
                             **options).double() for b in BACKENDS}
    for b in ("bptt", "fused"):
        layers[b].load_state_dict(layers["reference"].state_dict())
    x = torch.randn(7, 4, 4, dtype=torch.double)
    results = []
    for b in BACKENDS:
        out, (h, c) = layers[b](x, lengths=LENGTHS)
        grads = torch.autograd.grad(out.sum() + h.sum() + c.sum(), list(layers[b].parameters()))
        results.append((out, h, c, *grads))
    assert results[0][0].shape == (7, 4, 4) and results[0][2].shape == (4, 4, 6)
    for got in results[1:]:
        for a, b in zip(results[0], got):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"cannot become a LSTM: torch\.nn\.LSTM has neither"):
        layers["fused"].to_torch()


@pytest.mark.parametrize("peephole,coupled", [(False, False), (True, False), (False, True),
                                              (True, True)])
def test_gradcheck_of_the_hand_derived_backward(peephole, coupled):
    """The projection's backward in the cell math (dW_hr, and dh through W_hr), with lengths."""
    math = rnnkit.LSTM(3, 4, peephole=peephole, coupled=coupled, proj_size=2).math
    gates = math.num_gates * 4
    x = torch.randn(5, 3, 3, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    params = [torch.randn(gates, 3), torch.randn(gates, 2), torch.randn(gates), torch.randn(gates)]
    params += [torch.randn(4) for _ in math.diagonal_names] + [torch.randn(2, 4)]
    params = [p.double().mul(0.5).requires_grad_() for p in params]

    def run(x, h0, c0, *params):
        out, (h, c) = run_bptt(math, x, (h0, c0), params, [3, 3, 2, 2, 1])
        return out, h, c

    assert torch.autograd.gradcheck(run, (x, h0, c0, *params))


def test_fused_routes_are_explicit():
    """Each projected variant has a named path; none warns of a fallback; an unknown spec raises."""
    assert fused.route_of(CellSpec("lstm", projection=True)) == "torch"
    assert fused.native_op(CellSpec("lstm", projection=True)) is not None
    for peephole, coupled in ((True, False), (False, True), (True, True)):
        spec = CellSpec("lstm", peephole=peephole, coupled=coupled, projection=True)
        assert fused.route_of(spec) == "bptt" and fused.native_op(spec) is None
    with pytest.raises(ValueError, match=r"no fused kernel for CellSpec.*projection=True"):
        fused.route_of(CellSpec("gru", projection=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnkit.LSTM(3, 4, proj_size=2, peephole=True)(torch.randn(5, 2, 3))
        rnnkit.LSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), lengths=[5, 2])


def test_nan_propagates_as_torch():
    ref = nn.LSTM(3, 4, proj_size=2)
    layer = rnnkit.LSTM.from_torch(ref, backend="bptt")
    x = torch.randn(5, 2, 3)
    x[2, 1, 0] = float("nan")
    x[1, 0, 2] = float("inf")
    want, got = ref(x), layer(x)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    torch.testing.assert_close(got[1][1], want[1][1], equal_nan=True)


def test_bad_proj_size_and_states_are_one_clear_error():
    with pytest.raises(ValueError, match="proj_size must be smaller than hidden_size"):
        rnnkit.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="proj_size must be a non-negative integer"):
        rnnkit.LSTM(3, 4, proj_size=-1)
    with pytest.raises(TypeError):
        rnnkit.GRU(3, 4, proj_size=2)  # as torch.nn.GRU: no such argument
    layer = rnnkit.LSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="hx h_0"):
        layer(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    out, (h, c) = layer(torch.randn(5, 3), (torch.zeros(1, 2), torch.zeros(1, 4)))  # unbatched
    assert out.shape == (5, 2) and h.shape == (1, 2) and c.shape == (1, 4)


def test_pickle_loads_with_weights_only():
    layer = rnnkit.LSTM(3, 5, num_layers=2, proj_size=2, peephole=True).eval()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    with torch.serialization.safe_globals([rnnkit.LSTM]):
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert loaded.math.spec == layer.math.spec and loaded.math.projection
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(loaded(x)[0], layer(x)[0], rtol=0, atol=0)


def test_onnx_export_refuses_naming_proj_size(tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[dev]')")
    from rnnkit.export import ExportError, export_onnx

    path = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match=r"proj_size > 0 cannot be exported.*no projection"):
        export_onnx(rnnkit.LSTM(3, 4, proj_size=2).eval(), torch.randn(5, 2, 3), path)
    assert not path.exists()


# ---- device= and dtype= (torch.nn's factory_kwargs) ---------------------------------------------

FACTORIES = {
    "RNN": lambda **f: rnnkit.RNN(3, 4, num_layers=2, **f),
    "LSTM": lambda **f: rnnkit.LSTM(3, 4, bidirectional=True, peephole=True, **f),
    "LSTM-proj": lambda **f: rnnkit.LSTM(3, 4, proj_size=2, **f),
    "GRU": lambda **f: rnnkit.GRU(3, 4, reset="before", **f),
    "MinGRU": lambda **f: rnnkit.MinGRU(3, 4, **f),
    "MinLSTM": lambda **f: rnnkit.MinLSTM(3, 4, **f),
    "RNNCell": lambda **f: rnnkit.RNNCell(3, 4, **f),
    "LSTMCell": lambda **f: rnnkit.LSTMCell(3, 4, coupled=True, peephole=True, **f),
    "GRUCell": lambda **f: rnnkit.GRUCell(3, 4, **f),
    "MinGRUCell": lambda **f: rnnkit.MinGRUCell(3, 4, **f),
    "MinLSTMCell": lambda **f: rnnkit.MinLSTMCell(3, 4, **f),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_device_and_dtype_factory_arguments(name):
    make = FACTORIES[name]
    module = make(dtype=torch.float64, device="cpu")
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    x = torch.randn(2, 3, dtype=torch.float64)
    out, _ = module(x.unsqueeze(0)) if "Cell" not in name else module(x)
    assert out.dtype == torch.float64
    meta = make(device="meta")  # created without memory, as torch.nn does with device="meta"
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert [p.shape for p in meta.parameters()] == [p.shape for p in module.parameters()]


def test_factory_arguments_match_torch_and_from_torch_keeps_dtype():
    ref = nn.LSTM(3, 4, proj_size=2, dtype=torch.float64)
    layer = rnnkit.LSTM.from_torch(ref)
    assert layer.weight_hr_l0.dtype == torch.float64
    assert layer.to_torch().weight_hr_l0.dtype == torch.float64
    assert rnnkit.GRU.from_torch(nn.GRU(3, 4, dtype=torch.float64)).weight_hh_l0.dtype == \
        torch.float64


@pytest.mark.parametrize("options", [{}, {"peephole": True, "coupled": True}])
def test_gradcheck_stacked_bidirectional_with_lengths(options, monkeypatch):
    """The fused backend's projected routes (BPTT, in chunks for the ragged batch), end to end."""
    monkeypatch.setattr(fused, "CHUNK_ROWS", 0)
    monkeypatch.setattr(fused, "CHUNK_WEIGHTS", 0.0)
    layer = rnnkit.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, **options).double()
    # every projection and the recurrent weights that read the projected h (all of them would
    # take gradcheck several times longer); the other weights are covered by the tests above
    names = [n for n, _ in layer.named_parameters() if "weight_hr" in n or "weight_hh" in n]
    params = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]
    x = torch.randn(4, 3, 2, dtype=torch.double, requires_grad=True)

    def run(x, *weights):
        out, (h, c) = torch.func.functional_call(layer, dict(zip(names, weights)), (x,),
                                                 {"lengths": [4, 2, 1]}, strict=False)
        return out, h, c

    assert torch.autograd.gradcheck(run, (x, *params))
