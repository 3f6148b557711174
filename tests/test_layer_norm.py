"""Layer-normalised LSTM and GRU (issue 12): against an independent F.layer_norm implementation of
Ba et al. 2016, gradcheck of the hand-derived backward, every backend alike, NaN as the reference."""

from __future__ import annotations

import io
import itertools
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.cells import CellSpec, math_for
from rnnkit.cells.layer_norm import layer_norm_backward, layer_norm_forward
from rnnkit.engine import fused, run_layer
from rnnkit.engine.fused import _layer_norm
from rnnkit.engine.fused._function import config_of
from test_nonfinite import assert_same_values, run_with_grads

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")

# name -> (layer class, cell class, options)
FORMS = {
    "lstm": (rnnkit.LSTM, rnnkit.LSTMCell, {}),
    "lstm_peephole": (rnnkit.LSTM, rnnkit.LSTMCell, {"peephole": True}),
    "lstm_coupled": (rnnkit.LSTM, rnnkit.LSTMCell, {"coupled": True}),
    "lstm_peephole_coupled": (rnnkit.LSTM, rnnkit.LSTMCell, {"peephole": True, "coupled": True}),
    "gru_after": (rnnkit.GRU, rnnkit.GRUCell, {"reset": "after"}),
    "gru_before": (rnnkit.GRU, rnnkit.GRUCell, {"reset": "before"}),
}
BACKENDS = ("reference", "bptt", "fused")


def _layer(form: str, inputs: int = 5, hidden: int = 6, dtype=torch.float64, **kwargs):
    layer_class, _, options = FORMS[form]
    layer = layer_class(inputs, hidden, layer_norm=True, **options, **kwargs).to(dtype)
    with torch.no_grad():  # gains 1 and biases 0 would hide a gain or bias used in the wrong place
        for name, p in layer.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return layer


def _paper_step(form: str, x_t, state, p: dict):
    """One step written directly from the equations with F.layer_norm (not rnnkit's code)."""
    options = FORMS[form][2]
    ln = F.layer_norm
    gx = ln(x_t @ p["weight_ih_l0"].t(), (p["weight_ih_l0"].shape[0],),
            p["ln_ih_weight_l0"], p["ln_ih_bias_l0"])
    w_hh, g_hh, b_hh = p["weight_hh_l0"], p["ln_hh_weight_l0"], p["ln_hh_bias_l0"]
    if form.startswith("lstm"):
        h, c = state
        pre = gx + ln(h @ w_hh.t(), (w_hh.shape[0],), g_hh, b_hh)
        peep = options.get("peephole", False)
        if options.get("coupled", False):
            pi, pg, po = pre.chunk(3, 1)
            i = torch.sigmoid(pi + p["weight_ci_l0"] * c if peep else pi)
            f = 1 - i
        else:
            pi, pf, pg, po = pre.chunk(4, 1)
            i = torch.sigmoid(pi + p["weight_ci_l0"] * c if peep else pi)
            f = torch.sigmoid(pf + p["weight_cf_l0"] * c if peep else pf)
        c = f * c + i * torch.tanh(pg)
        o = torch.sigmoid(po + p["weight_co_l0"] * c if peep else po)
        h = o * torch.tanh(ln(c, (c.shape[1],), p["ln_cell_weight_l0"], p["ln_cell_bias_l0"]))
        return h, (h, c)
    (h,) = state
    H = h.shape[1]
    xr, xz, xn = gx.chunk(3, 1)
    if options["reset"] == "after":
        hr, hz, hn = ln(h @ w_hh.t(), (3 * H,), g_hh, b_hh).chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
    else:
        hr, hz = ln(h @ w_hh[:2 * H].t(), (2 * H,), g_hh[:2 * H], b_hh[:2 * H]).chunk(2, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + ln((r * h) @ w_hh[2 * H:].t(), (H,), g_hh[2 * H:], b_hh[2 * H:]))
    h = (1 - z) * n + z * h
    return h, (h,)


def _grads(fn, x, state0, params):
    outputs, final = fn(x, state0)
    weights = torch.linspace(-1, 1, outputs.numel(), dtype=outputs.dtype).view_as(outputs)
    loss = (outputs * weights).sum() + sum((f * f).sum() for f in final)
    return [outputs, *final, *torch.autograd.grad(loss, [x, *state0, *params])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_matches_the_paper_equations_written_with_f_layer_norm(form, backend):
    layer = _layer(form, backend=backend)
    names = [n for n, _ in layer.named_parameters()]
    params = list(layer.parameters())
    x = torch.randn(5, 3, 5, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
                   for _ in layer.math.state_names)

    def paper(x, state0):
        state, outputs = tuple(s[0] for s in state0), []
        for t in range(x.shape[0]):
            out, state = _paper_step(form, x[t], state, dict(zip(names, params)))
            outputs.append(out)
        return torch.stack(outputs), tuple(s.unsqueeze(0) for s in state)

    def ours(x, state0):
        out, final = layer(x, state0 if len(state0) == 2 else state0[0])
        return out, final if isinstance(final, tuple) else (final,)

    for got, expected in zip(_grads(ours, x, state0, params), _grads(paper, x, state0, params)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_backends_agree_stacked_bidirectional_with_lengths(form):
    layer = _layer(form, num_layers=2, bidirectional=True)
    x = torch.randn(7, 4, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 3, 5, 1])
    results = {}
    for backend in BACKENDS:
        layer.backend = backend
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        out, final = layer(x, lengths=lengths)
        final = final if isinstance(final, tuple) else (final,)
        (out.sin().sum() + sum(f.cos().sum() for f in final)).backward()
        results[backend] = [out, *final, x.grad, *(p.grad for p in layer.parameters())]
    for backend in ("bptt", "fused"):
        for got, expected in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("batch_sizes", [None, [3, 3, 2, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_gradcheck_through_bptt(form, batch_sizes):
    layer = _layer(form, inputs=2, hidden=3)
    math = layer.math
    params = tuple(p.detach().requires_grad_() for p in layer.layer_params(0, 0) if p is not None)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
                   for _ in math.state_names)
    count = len(state0)

    def run(x, *rest):
        weights = (rest[count], rest[count + 1], None, None, *rest[count + 2:])
        outputs, final = run_layer(math, x, rest[:count], weights, batch_sizes, "bptt")
        return (outputs, *final)

    assert torch.autograd.gradcheck(run, (x, *state0, *params))


def test_layer_norm_backward_gradcheck():
    a = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 9, dtype=torch.float64)
    y, a_hat, rstd = layer_norm_forward(a, weight, bias)
    torch.testing.assert_close(y, F.layer_norm(a, (9,), weight, bias))
    expected = torch.autograd.grad(y, (a, weight, bias), dy)
    got = layer_norm_backward(dy, a_hat, rstd, weight)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_cell_is_a_layer_of_length_one(form):
    layer_class, cell_class, options = FORMS[form]
    cell = cell_class(5, 6, layer_norm=True, **options).double()
    layer = layer_class(5, 6, layer_norm=True, **options).double()
    with torch.no_grad():
        for name, p in cell.named_parameters():
            p.copy_(torch.randn_like(p))
            getattr(layer, name + "_l0").copy_(p)
    x = torch.randn(3, 5, dtype=torch.float64)
    state = cell.zero_state(3)
    out, new_state = cell(x, state)
    expected, final = layer(x.unsqueeze(0), tuple(s.unsqueeze(0) for s in state)
                            if len(state) == 2 else state[0].unsqueeze(0))
    torch.testing.assert_close(out, expected[0])
    final = final if isinstance(final, tuple) else (final,)
    for got, want in zip(new_state, final):
        torch.testing.assert_close(got, want[0])
    assert "layer_norm=True" in repr(cell)


def test_parameters_names_shapes_and_initial_values():
    lstm = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, peephole=True, layer_norm=True)
    shapes = {n: tuple(p.shape) for n, p in lstm.named_parameters()}
    assert "bias_ih_l0" not in shapes and "bias_hh_l1_reverse" not in shapes
    assert shapes["ln_ih_weight_l1_reverse"] == (16,) and shapes["ln_hh_bias_l0"] == (16,)
    assert shapes["ln_cell_weight_l0"] == (4,) and shapes["weight_ci_l1"] == (4,)
    for name, p in lstm.named_parameters():
        if name.startswith("ln_"):
            assert torch.all(p == (1.0 if "_weight" in name else 0.0)), name
    gru = rnnkit.GRUCell(3, 4, layer_norm=True)
    assert sorted(n for n, _ in gru.named_parameters()) == [
        "ln_hh_bias", "ln_hh_weight", "ln_ih_bias", "ln_ih_weight", "weight_hh", "weight_ih"]


def test_forget_bias_goes_to_the_layer_norm_bias():
    lstm = rnnkit.LSTM(3, 4, layer_norm=True, forget_bias=1.0)
    assert torch.all(lstm.ln_ih_bias_l0[4:8] == 1.0) and torch.all(lstm.ln_hh_bias_l0 == 0.0)
    cifg = rnnkit.LSTMCell(3, 4, coupled=True, layer_norm=True, forget_bias=1.0)
    assert torch.all(cifg.ln_ih_bias[:4] == -1.0)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="layer_norm=True needs bias=True"):
        rnnkit.LSTM(3, 4, bias=False, layer_norm=True)
    with pytest.raises(ValueError, match="layer_norm=True needs bias=True"):
        rnnkit.GRUCell(3, 4, bias=False, layer_norm=True)
    with pytest.raises(ValueError, match="layer_norm is an LSTM and GRU option"):
        math_for(CellSpec("rnn", layer_norm=True))
    with pytest.raises(ValueError, match="no layer normalisation"):
        rnnkit.GRU(3, 4, layer_norm=True).to_torch()


def test_fused_backend_has_a_kernel_for_every_form_and_no_other():
    for form in FORMS:
        spec = _layer(form).math.spec
        assert spec.layer_norm and spec in _layer_norm.KERNELS
        with pytest.raises(ValueError, match="no fused kernel"):
            config_of(spec)  # never the plain cell's kernel
        assert fused.unavailable_reason(spec, torch.float32, "cpu") is None
    assert set(_layer_norm.KERNELS) == {_layer(form).math.spec for form in FORMS}
    assert fused.native_op(rnnkit.LSTM(3, 4, layer_norm=True).math) is None
    layer = rnnkit.LSTM(3, 4, layer_norm=True, backend="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 1, 3))


# [3, 3, 1, 0]: no row runs at the last step (the packed rows end before T)
@pytest.mark.parametrize("batch_sizes", [[4, 3, 3, 1], [3, 3, 1, 0]], ids=["ragged", "all_short"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_fused_kernel_gradcheck_with_lengths(form, threads, batch_sizes, monkeypatch):
    monkeypatch.setattr(_layer_norm, "loop_threads", threads)  # 3: several row blocks
    layer = _layer(form, inputs=2, hidden=3)
    math = layer.math
    params = tuple(p.detach().requires_grad_() for p in layer.layer_params(0, 0) if p is not None)
    x = torch.randn(4, 4, 2, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
                   for _ in math.state_names)
    count = len(state0)

    def run(x, *rest):
        weights = (rest[count], rest[count + 1], None, None, *rest[count + 2:])
        outputs, final = run_layer(math, x, rest[:count], weights, batch_sizes, "fused")
        return (outputs, *final)

    assert torch.autograd.gradcheck(run, (x, *state0, *params))


def _dirty_freed_memory() -> None:
    """NaN in memory just freed (as tests/test_fused_memory.py): a buffer the kernel leaves
    unwritten then reads NaN, not a lucky 0."""
    junk = [torch.full((size,), NAN) for size in (16, 64, 256, 1024, 4096, 65536) for _ in (0, 1)]
    del junk


def _run_with_lengths(layer, x, lengths):
    """Outputs, final states, dx and every parameter's gradient of a layer with ``lengths=``
    (a loss that reads the outputs and every final state)."""
    x = x.detach().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    out, final = layer(x, lengths=lengths) if lengths is not None else layer(x)
    final = final if isinstance(final, tuple) else (final,)
    (out.sin().sum() + sum(f.cos().sum() for f in final)).backward()
    return [out, *final, x.grad, *(p.grad for p in layer.parameters())]


# The layer-normalised kernels run a ragged batch packed (StepRows in layer_norm_rnn.cpp): the
# products over the rows that run only, x's padding never read. 2 bidirectional layers
# (the reverse direction starts at each row's own last step), lengths 1 and T among them;
# loop_threads 2: two row blocks (each thread's loop on its rows; torch stays on one thread).
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_fused_lengths_match_reference_and_each_row_alone(form, dtype, threads, monkeypatch):
    monkeypatch.setattr(_layer_norm, "loop_threads", threads)
    tol = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-4}
    layer = _layer(form, dtype=dtype, num_layers=2, bidirectional=True)
    lengths = torch.tensor([7, 1, 5, 3, 7, 2])  # (unsorted, ties, 1 and T)
    x = torch.randn(7, 6, 5, dtype=dtype)
    padding = (torch.arange(7).unsqueeze(1) >= lengths).unsqueeze(-1)  # (T, B, 1)
    layer.backend = "fused"
    got = _run_with_lengths(layer, x.masked_fill(padding, NAN), lengths)  # (never read)
    out, x_grad = got[0], got[len(got) - len(list(layer.parameters())) - 1]
    assert torch.equal(out.masked_select(padding), torch.zeros_like(out.masked_select(padding)))
    assert torch.equal(x_grad.masked_select(padding), torch.zeros_like(x_grad.masked_select(padding)))
    assert all(torch.isfinite(g).all() for g in got)
    layer.backend = "reference"  # (rnnkit's plain-torch engine, on zeroed padding)
    want = _run_with_lengths(layer, x.masked_fill(padding, 0.0), lengths)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    # each row alone, padded to its own length (no lengths=): the same outputs, final states
    # and dx, and the parameters' gradients are the sum over the rows (the loss is)
    layer.backend = "fused"
    sums = [torch.zeros_like(p) for p in layer.parameters()]
    for b, length in enumerate(lengths.tolist()):
        alone = _run_with_lengths(layer, x[:length, b:b + 1], None)
        out_b, *rest = alone
        torch.testing.assert_close(out[:length, b:b + 1], out_b, **tol)
        states = len(rest) - len(sums) - 1
        for k in range(states):
            torch.testing.assert_close(got[1 + k][:, b:b + 1], rest[k], **tol)
        torch.testing.assert_close(x_grad[:length, b:b + 1], rest[states], **tol)
        for acc, g in zip(sums, rest[states + 1:]):
            acc += g
    for acc, g in zip(sums, got[len(got) - len(sums):]):
        torch.testing.assert_close(g, acc, **tol)


# A longer sequence that no row runs to its end (every length < T: the packed rows stop before
# the last steps), after NaN was left in freed memory: outputs, states and gradients as the
# reference engine's, and the padding of the outputs and of dx exactly 0.
@pytest.mark.parametrize("form", sorted(FORMS))
def test_fused_lengths_all_rows_shorter_than_t_on_dirty_memory(form, monkeypatch):
    monkeypatch.setattr(_layer_norm, "loop_threads", 2)
    layer = _layer(form, 8, 16, dtype=torch.float32)
    lengths = torch.tensor([30, 17, 25, 1, 9])
    x = torch.randn(40, 5, 8)
    padding = (torch.arange(40).unsqueeze(1) >= lengths).unsqueeze(-1)
    layer.backend = "reference"
    want = _run_with_lengths(layer, x.masked_fill(padding, 0.0), lengths)
    layer.backend = "fused"
    for _ in range(2):
        _dirty_freed_memory()
        got = _run_with_lengths(layer, x.masked_fill(padding, NAN), lengths)
        assert torch.equal(got[0].masked_select(padding), torch.zeros(int(padding.sum()) * 16))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)  # (float32 sums)


def test_ln_kernel_refuses_batch_sizes_it_cannot_run():
    """The loops trust batch_sizes (a block stops at its first step without rows; packed rows
    are found by the running sum): the operator checks them."""
    if _layer_norm.load() is None:
        pytest.skip(f"no layer-norm kernel: {_layer_norm.EXTENSION.error}")
    hidden, batch = 3, 2
    ln = (torch.ones(3 * hidden), torch.zeros(3 * hidden))
    h0, w_hh = torch.zeros(batch, hidden), torch.randn(3 * hidden, hidden)

    def forward(gx, batch_sizes):
        return torch.ops.rnnkit_ln.layer_forward(2, False, False, False, gx, h0, None, w_hh, *ln,
                                                 None, None, None, None, None, batch_sizes,
                                                 False, 1)

    with pytest.raises(RuntimeError, match="non-increasing"):
        forward(torch.randn(3, 3 * hidden), [1, 2])  # (packed: 3 rows, but increasing)
    with pytest.raises(RuntimeError, match="sum\\(batch_sizes\\) rows"):
        forward(torch.randn(4, 3 * hidden), [2, 1])
    with pytest.raises(RuntimeError, match="one entry per step"):
        forward(torch.randn(3, batch, 3 * hidden), [2, 1])
    y, h, *_ = forward(torch.randn(3, 3 * hidden), [2, 1])  # packed: y padded, its padding 0
    assert y.shape == (2, batch, hidden) and torch.equal(y[1, 1], torch.zeros(hidden))
    torch.testing.assert_close(h[1], y[0, 1])  # (row 1's final state: its last step, t = 0)


# (batch 13, 20 units: per-step products of more rows than gemm_own's packing threshold, and
# gate widths that are not multiples of its 16-column strips, on the CPUs that run it)
@pytest.mark.parametrize("form,batch,hidden", [
    (form, batch, hidden) for form in sorted(FORMS) for batch, hidden in ((5, 16), (13, 20))])
def test_fused_kernel_float32_and_inference_match_bptt(form, batch, hidden, monkeypatch):
    monkeypatch.setattr(_layer_norm, "loop_threads", 2)
    layer = _layer(form, 8, hidden, dtype=torch.float32, num_layers=2)
    x = torch.randn(9, batch, 8)
    lengths = torch.tensor([9, 2, 7, 7, 4, 9, 3, 1, 8, 6, 5, 2, 9][:batch])
    results = {}
    for backend in ("bptt", "fused"):
        layer.backend = backend
        with torch.no_grad():
            inference = layer(x, lengths=lengths)[0]
        out, _ = layer(x, lengths=lengths)
        grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
        results[backend] = [inference, out, *grads]
    for got, expected in zip(results["fused"], results["bptt"]):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)  # (float32 exp, sums)


# (the LSTM: its kernel normalises the input itself, so without the kernel the engine must)
@pytest.mark.parametrize("module", [rnnkit.GRU, rnnkit.LSTM])
def test_without_the_kernel_the_fused_backend_takes_bptt_and_says_why(module, monkeypatch):
    error = f"test: no compiler ({module.__name__})"  # (each reason is warned once)
    monkeypatch.setattr(_layer_norm, "EXTENSION", SimpleNamespace(load=lambda: None, error=error))
    layer = module(3, 4, layer_norm=True, backend="fused")
    x = torch.randn(2, 1, 3)
    with pytest.warns(RuntimeWarning, match=re.escape(error)):
        out, _ = layer(x)
    layer.backend = "bptt"
    torch.testing.assert_close(out, layer(x)[0], rtol=0, atol=0)


# The fallback zeroes x's padding once, in run_layer before the input LN (run_fused's BPTT
# fallback no longer zeroes the normalised input again): NaN there reaches nothing.
@pytest.mark.parametrize("form", ["lstm_peephole", "gru_before"])
def test_without_the_kernel_nan_padding_with_lengths_matches_bptt(form, monkeypatch):
    error = f"test: no compiler, lengths ({form})"
    monkeypatch.setattr(_layer_norm, "EXTENSION", SimpleNamespace(load=lambda: None, error=error))
    layer = _layer(form)
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(5, 3, 5, dtype=torch.float64)
    padding = (torch.arange(5).unsqueeze(1) >= lengths).unsqueeze(-1)
    layer.backend = "fused"
    with pytest.warns(RuntimeWarning, match=re.escape(error)):
        got = _run_with_lengths(layer, x.masked_fill(padding, NAN), lengths)
    layer.backend = "bptt"
    want = _run_with_lengths(layer, x.masked_fill(padding, 0.0), lengths)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["lstm_peephole", "gru_after", "gru_before"])
def test_the_kernel_normalises_the_input_itself_and_matches_f_layer_norm(form, monkeypatch):
    """Every fused kernel takes x W_ih^T and applies the input LN per row in its loop (forward
    and backward; the reset-before GRU's backward in its second pass over the rows, session 13):
    the same outputs and gradients as the input normalised beforehand (F.layer_norm);
    peepholes, so that their gradients (now summed in the loop) are compared too."""
    monkeypatch.setattr(_layer_norm, "BRGEMM_MIN_MACS", 1)  # (and the tiled products)
    layer = _layer(form, 6, 20, dtype=torch.float32)
    math = layer.math
    params = tuple(layer.layer_params(0, 0))
    assert fused.normalises_input(math, torch.zeros(1, dtype=torch.float32))
    x = torch.randn(7, 13, 6, requires_grad=True)
    state0 = tuple(torch.randn(13, 20, requires_grad=True) for _ in math.state_names)
    leaves = [x, *state0, *(p for p in params if p is not None)]
    results = []
    for fused_input_ln in (True, False):
        monkeypatch.setattr(fused, "normalises_input", lambda *_, on=fused_input_ln: on)
        out, final = run_layer(math, x, state0, params, None, "fused")
        loss = out.square().sum() + sum(s.sum() for s in final)
        results.append([out, *final, *torch.autograd.grad(loss, leaves)])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_pickle_and_state_dict_round_trip(form):
    layer = _layer(form, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.math.spec == layer.math.spec
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(loaded(x)[0], layer(x)[0])
    fresh = FORMS[form][0](5, 6, layer_norm=True, **FORMS[form][2])
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x)[0], layer(x)[0])


PLACES = ("input", "h0", "weight_ih", "weight_hh", "ln_hh_weight")


@pytest.mark.parametrize("form,place,value", [
    (form, place, (NAN, INF, -INF)[i % 3])
    for i, (form, place) in enumerate(itertools.product(sorted(FORMS), PLACES))
])
def test_nonfinite_propagates_like_the_reference(form, place, value):
    torch.manual_seed(1)
    reference = _layer(form, 6, 16, dtype=torch.float32, backend="reference")
    x = torch.randn(5, 3, 6)
    hx = tuple(torch.randn(1, 3, 16) for _ in reference.math.state_names)
    with torch.no_grad():
        target = {"input": x, "h0": hx[0], "weight_ih": reference.weight_ih_l0,
                  "weight_hh": reference.weight_hh_l0,
                  "ln_hh_weight": reference.ln_hh_weight_l0}[place]
        target.view(-1)[target.numel() // 2 + 1] = value
    expected = run_with_grads(reference, x, hx)
    assert any(not t.isfinite().all() for t in expected if t is not None)
    names = ["output", "final", *([] if len(hx) == 1 else ["final c"]), "d input",
             *(f"d {s}0" for s in reference.math.state_names),
             *(f"d {n}" for n, _ in reference.named_parameters())]
    for backend in ("bptt", "fused"):
        module = FORMS[form][0](6, 16, layer_norm=True, backend=backend, **FORMS[form][2])
        module.load_state_dict(reference.state_dict())
        for name, e, a in zip(names, expected, run_with_grads(module, x, hx)):
            assert_same_values(e, a, f"{backend}: {name}")


@pytest.mark.parametrize("threads", [1, 2])
def test_tiled_matmul_equals_torch_mm(threads):
    # the layer-normalised kernels' whole-sequence products (brgemm tiles of 256: ragged tiles
    # in M, N and K here) against torch.mm in float64; float64 inputs take torch.mm itself
    if _layer_norm.load() is None:
        pytest.skip(f"no layer-norm kernel: {_layer_norm.EXTENSION.error}")
    torch.set_num_threads(threads)  # (the fixture restores the count)
    for m, k, n in ((1, 1, 1), (300, 513, 257), (7, 256, 600), (0, 4, 3), (3, 0, 5), (4, 6, 0)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        got = torch.ops.rnnkit_ln.matmul(a, b)
        assert got.shape == (m, n) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-4)
        # a non-contiguous operand is read as its values
        transposed = b.t().contiguous().t()
        torch.testing.assert_close(torch.ops.rnnkit_ln.matmul(a, transposed), got, rtol=0, atol=0)
    a, b = torch.randn(9, 300, dtype=torch.float64), torch.randn(300, 5, dtype=torch.float64)
    assert torch.equal(torch.ops.rnnkit_ln.matmul(a, b), a @ b)
    with pytest.raises(RuntimeError, match="do not multiply"):
        torch.ops.rnnkit_ln.matmul(a, a)


def test_fused_input_projection_gradcheck_and_float32_gradients(monkeypatch):
    monkeypatch.setattr(_layer_norm, "BRGEMM_MIN_MACS", 1)  # (the tiles at a test's size)
    if _layer_norm.load() is None:
        pytest.skip(f"no layer-norm kernel: {_layer_norm.EXTENSION.error}")
    # the hand-written backward (dx = d W, dW = (xᵀ d)ᵀ) in float64
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_layer_norm._Projection.apply, (x, w))
    # float32 through the brgemm tiles, against torch's product (T·B = 600 rows: several tiles)
    x = torch.randn(30, 20, 300, requires_grad=True)
    w = torch.randn(520, 300, requires_grad=True)
    d = torch.randn(30, 20, 520)
    got = _layer_norm.project(x, w)
    assert type(got.grad_fn).__name__ == "_ProjectionBackward"
    got_grads = torch.autograd.grad(got, (x, w), d)
    expected = x.double() @ w.double().t()
    expected_grads = torch.autograd.grad(expected, (x, w), d.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("form", ["lstm_peephole", "gru_after", "gru_before"])
def test_tiled_products_give_the_layers_gradients(form, monkeypatch):
    # the whole layer with every product on the brgemm tiles (x W_ih^T, dx, dW_ih, dW_hh) against
    # the same layer on torch's products, float32
    if _layer_norm.load() is None:
        pytest.skip(f"no layer-norm kernel: {_layer_norm.EXTENSION.error}")
    layer = _layer(form, 12, 20, dtype=torch.float32, backend="fused")
    x = torch.randn(9, 5, 12, requires_grad=True)
    results = []
    for macs in (1, 2**62):
        monkeypatch.setattr(_layer_norm, "BRGEMM_MIN_MACS", macs)
        out, _ = layer(x)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _cell(form: str, inputs: int, hidden: int, dtype=torch.float64, **kwargs):
    """A layer-normalised cell with every parameter drawn (LN gains and biases off 1 and 0)."""
    _, cell_class, options = FORMS[form]
    cell = cell_class(inputs, hidden, layer_norm=True, **options, **kwargs).to(dtype)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return cell


def _no_layer_path(monkeypatch):
    """Makes the layer path (the kernel's time loop and bptt) fail, so a test sees the step op."""
    def refuse(*args, **kwargs):
        raise AssertionError("the cell step took the layer path")
    monkeypatch.setattr(_layer_norm, "run", refuse)
    monkeypatch.setattr(rnnkit.engine, "run_layer", refuse)


# (batch, inputs, hidden): 0 rows; 1 row (the streaming step: products by dot_rows, with row and
# column tails past the 8-wide blocks); up to 4 rows (dot_rows); 7 rows (a GEMM and W_hh^T)
STEP_SHAPES = [(0, 5, 6), (1, 37, 29), (1, 16, 64), (3, 10, 12), (7, 20, 24)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch,inputs,hidden", STEP_SHAPES)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_cell_step_without_autograd_matches_the_paper_equations(form, batch, inputs, hidden,
                                                                dtype, monkeypatch):
    """The cell call under no_grad (rnnkit_ln::step, the lean path) against the equations
    written with F.layer_norm in float64; also through engine.run_step (parameters that need no
    gradient, grad mode on), and with the state left out (zeros)."""
    torch.manual_seed(3)
    cell = _cell(form, inputs, hidden, dtype)
    x = torch.randn(batch, inputs, dtype=dtype)
    state = cell.math.make_state([torch.randn(batch, hidden, dtype=dtype)
                                  for _ in cell.math.state_names])
    p = {name + "_l0": v.detach().double() for name, v in cell.named_parameters()}
    _, want = _paper_step(form, x.double(), tuple(s.double() for s in state), p)
    _, want_from_zeros = _paper_step(form, x.double(), tuple(torch.zeros_like(s).double()
                                                             for s in state), p)
    _no_layer_path(monkeypatch)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}
    with torch.no_grad():
        out, got = cell(x, state)
        _, got_from_zeros = cell(x)
    cell.requires_grad_(False)
    _, got_frozen = cell(x, state)  # (grad mode on, nothing to differentiate: engine.run_step)
    assert out is got[0] and type(got) is type(state)
    for new in (got, got_frozen):
        for g, w in zip(new, want):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), w, **tol)
    for g, w in zip(got_from_zeros, want_from_zeros):
        torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_cell_step_with_gradients_still_differentiates(form):
    """A cell call that needs gradients keeps the layer path (autograd): gradcheck in float64."""
    torch.manual_seed(4)
    cell = _cell(form, 4, 5)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
                  for _ in cell.math.state_names)

    def step(x, *state):
        return tuple(cell(x, cell.math.make_state(state))[1])

    assert torch.autograd.gradcheck(step, (x, *state))


@pytest.mark.parametrize("form,place,value", [
    (form, place, (NAN, INF, -INF)[i % 3])
    for i, (form, place) in enumerate(itertools.product(
        sorted(FORMS), ("input", "h", "weight_ih", "weight_hh")))
] + [(form, place, NAN) for form in sorted(FORMS) for place in ("ln_ih_bias", "ln_hh_weight")])
# (an infinite LN gain or bias can saturate a gate and leave the state finite)
def test_cell_step_nonfinite_propagates_like_the_reference(form, place, value):
    """NaN and ±inf through the no-grad step land where the reference backend's cell puts them."""
    torch.manual_seed(5)
    reference = _cell(form, 6, 16, torch.float32)
    cell = _cell(form, 6, 16, torch.float32)
    x = torch.randn(3, 6)
    state = [torch.randn(3, 16) for _ in cell.math.state_names]
    with torch.no_grad():
        target = {"input": x, "h": state[0], "weight_ih": reference.weight_ih,
                  "weight_hh": reference.weight_hh, "ln_ih_bias": reference.ln_ih_bias,
                  "ln_hh_weight": reference.ln_hh_weight}[place]
        target.view(-1)[target.numel() // 2 + 1] = value
        cell.load_state_dict(reference.state_dict())
        previous = rnnkit.engine.get_default_backend()
        rnnkit.engine.set_default_backend("reference")
        try:
            _, expected = reference(x, cell.math.make_state(state))
        finally:
            rnnkit.engine.set_default_backend(previous)
        _, actual = cell(x, cell.math.make_state(state))
    assert any(not t.isfinite().all() for t in expected)
    for name, e, a in zip(cell.math.state_names, expected, actual):
        assert_same_values(e, a, name)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_empty_batch_trains_like_torch(form, backend, dtype):
    """Batch 0: empty outputs and states, zero gradients (the reset-before GRU's kernel backward
    viewed its activations as (0, -1), which torch refuses: review, session 15)."""
    layer = _layer(form, dtype=dtype, bidirectional=True, backend=backend)
    x = torch.randn(4, 0, 5, dtype=dtype, requires_grad=True)
    output, final = layer(x)
    states = final if isinstance(final, tuple) else (final,)
    (output.sum() + sum(s.sum() for s in states)).backward()
    assert output.shape == (4, 0, 12) and all(s.shape == (2, 0, 6) for s in states)
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
