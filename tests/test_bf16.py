"""bfloat16 mixed precision under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (issue 16).

Tolerances: bf16 keeps 8 significant bits, so rounding a GEMM operand changes it by at most
2^-9 relative (~2e-3), a product of two rounded operands by ~2^-8 (~4e-3). With weights of size
~1/sqrt(H) a pre-activation is a sum of O(1) magnitude whose rounding errors partly cancel; the
gates (|derivative| <= 1) do not amplify them, so outputs in [-1, 1] differ from float32 by a
few 1e-3 and we allow 3e-2 after 12 steps; gradients (sums over all steps) are compared by
relative norm, 5e-2. The emulation test is far tighter (1e-4): there the same bf16 roundings are
applied in float64, and only float32 accumulation order is left.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rnnkit
from conftest import LAYER_VARIANTS
from rnnkit.engine import precision, run_layer

NAN, INF = float("nan"), float("inf")
MISSING = precision.bf16_missing()
needs_bf16 = pytest.mark.skipif(MISSING is not None, reason=f"no bf16 mode here: {MISSING}")



def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """float64 view of t rounded to bfloat16 (round to nearest even, as the kernel)."""
    return t.to(torch.bfloat16).double()


def outputs_and_grads(module, x, hx, lengths=None):
    out, state = module(x, hx, lengths=lengths)
    state = state if isinstance(state, tuple) else (state,)
    loss = out.float().pow(2).sum() + sum(s.float().sum() for s in state)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, [x, *hx, *params]) if isinstance(hx, tuple) else \
        torch.autograd.grad(loss, [x, hx, *params])
    return out, state, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@needs_bf16
@pytest.mark.parametrize("name", sorted(LAYER_VARIANTS))
def test_every_variant_close_to_float32(name):
    cls, options = LAYER_VARIANTS[name]
    torch.manual_seed(0)
    module = cls(12, 40, num_layers=2, bidirectional=True, **options)
    x = torch.randn(12, 5, 12, requires_grad=True)
    states = 2 if cls is rnnkit.LSTM else 1
    hx = tuple(torch.randn(4, 5, 40, requires_grad=True) * 0.5 for _ in range(states))
    hx = tuple(h.detach().requires_grad_() for h in hx)
    lengths = [12, 11, 8, 8, 3]
    arg = hx if states == 2 else hx[0]
    want_out, want_state, want_grads = outputs_and_grads(module, x, arg, lengths)
    with autocast():
        out, state, grads = outputs_and_grads(module, x, arg, lengths)
    expected = torch.float32 if cls is rnnkit.GRU else torch.bfloat16  # torch.nn's choice
    assert out.dtype == expected and all(s.dtype == expected for s in state)
    torch.testing.assert_close(out.float(), want_out, atol=3e-2, rtol=0)
    for s, w in zip(state, want_state):
        torch.testing.assert_close(s.float(), w, atol=3e-2, rtol=0)
    assert out[8:, 3:].abs().max() == 0  # past each length: zeros, as in float32
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32  # the master weights' (and x's) gradients stay float32
        assert rel_err(g, w) < 5e-2, rel_err(g, w)


@needs_bf16
@pytest.mark.parametrize("name", sorted(LAYER_VARIANTS))
def test_batch_split_equals_one_thread(name, monkeypatch):
    # the kernels' loops on 2 threads, a block of the 33 rows each (bf16 mode, lengths): each
    # row's arithmetic is the one-thread loop's
    from rnnkit.engine import fused
    from rnnkit.engine.fused import _function

    cls, options = LAYER_VARIANTS[name]
    torch.manual_seed(0)
    module = cls(12, 40, **options)
    x = torch.randn(9, 33, 12, requires_grad=True)
    hx = tuple(torch.randn(1, 33, 40, requires_grad=True) for _ in range(2 if cls is rnnkit.LSTM else 1))
    arg = hx if len(hx) == 2 else hx[0]
    lengths = [9] * 12 + [7] * 11 + [2] * 10
    monkeypatch.setattr(fused, "use_native", False)
    monkeypatch.setattr(_function, "loop_threads", 1)
    with autocast():
        want = outputs_and_grads(module, x, arg, lengths)
    monkeypatch.setattr(_function, "loop_threads", 2)
    with fused.thread_split("batch"), autocast():
        got = outputs_and_grads(module, x, arg, lengths)
    for g, w in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@needs_bf16
@pytest.mark.parametrize("name", ["rnn_tanh", "rnn_relu", "lstm", "gru_after"])
def test_same_dtypes_and_close_to_torch_nn_under_autocast(name):
    cls, options = LAYER_VARIANTS[name]
    torch.manual_seed(1)
    module = cls(10, 48, num_layers=2, **options)
    reference = module.to_torch()  # (its torch.nn twin, same weights)
    x = torch.randn(15, 6, 10)
    with autocast():
        want_out, want_state = reference(x)
        out, state = module(x)
    want_state = want_state if isinstance(want_state, tuple) else (want_state,)
    state = state if isinstance(state, tuple) else (state,)
    assert out.dtype == want_out.dtype
    assert [s.dtype for s in state] == [s.dtype for s in want_state]
    # torch rounds more (its LSTM keeps bf16 states): each is within 3e-2 of float32
    torch.testing.assert_close(out.float(), want_out.float(), atol=6e-2, rtol=0)


def emulate(kind: str, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """The bf16 mode's arithmetic in float64: bf16-rounded GEMM operands, exact products and
    sums, float64 pointwise math (the float32 kernel differs by accumulation rounding only)."""
    H = h0.shape[1]
    gx = bf16(x) @ bf16(w_ih).T + b_ih.double()
    h, c = h0.double(), None if c0 is None else c0.double()
    wr, bh = bf16(w_hh), b_hh.double()
    ys = []
    for t in range(x.shape[0]):
        g = gx[t]
        if kind == "lstm":
            i, f, n, o = (g + bf16(h) @ wr.T + bh).split(H, 1)
            c = f.sigmoid() * c + i.sigmoid() * n.tanh()
            h = o.sigmoid() * c.tanh()
        elif kind == "gru_after":
            hr = bf16(h) @ wr.T + bh
            r = (g[:, :H] + hr[:, :H]).sigmoid()
            z = (g[:, H:2 * H] + hr[:, H:2 * H]).sigmoid()
            n = (g[:, 2 * H:] + r * hr[:, 2 * H:]).tanh()
            h = (1 - z) * n + z * h
        elif kind == "gru_before":
            hr = bf16(h) @ wr[:2 * H].T + bh[:2 * H]
            r = (g[:, :H] + hr[:, :H]).sigmoid()
            z = (g[:, H:2 * H] + hr[:, H:]).sigmoid()
            n = (g[:, 2 * H:] + bf16(r * h) @ wr[2 * H:].T + bh[2 * H:]).tanh()
            h = (1 - z) * n + z * h
        else:
            h = (g + bf16(h) @ wr.T + bh).tanh()
        ys.append(h)
    return torch.stack(ys)


@needs_bf16
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru_after", "gru_before"])
def test_forward_is_bf16_gemm_inputs_with_float32_accumulation(kind):
    """Not just close to float32: exactly the rounding the design promises (and no other);
    the float32 kernel is checked to be measurably different from the emulation."""
    cls, options = LAYER_VARIANTS[kind]
    torch.manual_seed(2)
    module = cls(33, 37, **options)  # odd sizes: the VNNI layout's padding
    x = torch.randn(9, 4, 33)
    states = 2 if cls is rnnkit.LSTM else 1
    hx = tuple(torch.randn(1, 4, 37) for _ in range(states))
    with torch.no_grad(), autocast():  # the engine's result, before the layer's output dtype
        out, _ = run_layer(module.math, x, tuple(h[0] for h in hx), module.layer_params(0, 0))
    assert out.dtype == torch.float32
    want = emulate(kind, x, hx[0][0], hx[1][0] if states == 2 else None, module.weight_ih_l0,
                   module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=0)
    with torch.no_grad():  # the test can tell: the float32 kernel is far from this emulation
        plain, _ = run_layer(module.math, x, tuple(h[0] for h in hx), module.layer_params(0, 0))
    assert (plain.double() - want).abs().max() > 1e-3


@needs_bf16
def test_float32_state_inside_bf16_outputs_only_at_the_end():
    """The kernel's own outputs are float32 (the rounding to torch.nn's dtype happens once, at
    the layer's end): a 2-layer stack equals two 1-layer layers fed float32."""
    torch.manual_seed(3)
    stack = rnnkit.LSTM(8, 16, num_layers=2)
    x = torch.randn(6, 3, 8)
    with torch.no_grad(), autocast():
        out, _ = stack(x)
        from rnnkit.engine import run_layer

        first, _ = run_layer(stack.math, x, (torch.zeros(3, 16), torch.zeros(3, 16)),
                             stack.layer_params(0, 0))
        assert first.dtype == torch.float32
        second, _ = run_layer(stack.math, first, (torch.zeros(3, 16), torch.zeros(3, 16)),
                              stack.layer_params(1, 0))
    assert torch.equal(out, second.to(torch.bfloat16))


@needs_bf16
@pytest.mark.parametrize("name", ["lstm_peephole", "gru_before", "rnn_relu"])
@pytest.mark.parametrize("where", ["input", "weight_hh", "state"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_propagates_as_in_float32(name, where, value):
    cls, options = LAYER_VARIANTS[name]
    torch.manual_seed(4)
    module = cls(6, 10, **options)
    x = torch.randn(7, 3, 6)
    states = 2 if cls is rnnkit.LSTM else 1
    hx = [torch.randn(1, 3, 10) for _ in range(states)]
    if where == "input":
        x[3, 1, 2] = value
    elif where == "state":
        hx[0][0, 2, 4] = value
    else:
        with torch.no_grad():
            module.weight_hh_l0[5, 7] = value
    x.requires_grad_()
    hx = [h.requires_grad_() for h in hx]
    arg = tuple(hx) if states == 2 else hx[0]
    results = []
    for mixed in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out, state, grads = outputs_and_grads(module, x, arg)
        results.append([out.float(), *(s.float() for s in state), *grads])
    for want, got in zip(*results):
        assert torch.equal(want.isnan(), got.isnan())
        for sign in (1, -1):
            assert torch.equal(want == sign * INF, got == sign * INF)


@needs_bf16
def test_bf16_input_and_state_are_accepted():
    torch.manual_seed(5)
    module = rnnkit.GRU(4, 8)
    x = torch.randn(5, 2, 4).to(torch.bfloat16)
    h = torch.randn(1, 2, 8).to(torch.bfloat16)
    with autocast():
        out, _ = module(x, h)
    want, _ = module(x.float(), h.float())
    torch.testing.assert_close(out, want, atol=3e-2, rtol=0)


@needs_bf16
@pytest.mark.parametrize("options", [{"layer_norm": True}, {"proj_size": 4}])
def test_variant_without_bf16_kernel_warns_once_and_runs_float32(options):
    torch.manual_seed(6)
    module = rnnkit.LSTM(5, 9, **options)
    x = torch.randn(4, 2, 5)
    want, _ = module(x)
    precision._warned.clear()
    with pytest.warns(RuntimeWarning, match="no bfloat16 mixed-precision path; it runs in float32"
                      ), autocast():
        out, _ = module(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        with autocast():
            module(x)
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float())


@needs_bf16
def test_float16_autocast_runs_float32_and_says_so():
    module = rnnkit.RNN(3, 4)
    x = torch.randn(2, 1, 3)
    precision._warned.clear()
    with pytest.warns(RuntimeWarning, match="float16"), torch.autocast("cpu", dtype=torch.float16):
        out, _ = module(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, module(x)[0])


def test_refused_on_a_cpu_without_bf16(monkeypatch):
    """A CPU without avx512_bf16 / amx_bf16: one line naming what is missing, nothing run."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"fpu", "avx2", "avx512f"}))
    precision.bf16_missing.cache_clear()
    try:
        with autocast(), pytest.raises(RuntimeError) as error:
            rnnkit.LSTM(3, 4)(torch.randn(2, 1, 3))
    finally:
        precision.bf16_missing.cache_clear()
    message = str(error.value)
    assert "\n" not in message
    assert "bfloat16" in message and "avx512_bf16" in message and "amx_bf16" in message


def test_outside_autocast_nothing_changes():
    torch.manual_seed(7)
    module = rnnkit.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        out, _ = module(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, module(x)[0])


def _charlm_args(tmp_path, steps: int, precision_name: str) -> list[str]:
    text = tmp_path / "input.txt"
    if not text.exists():
        text.write_text("def hello(world):\n    return world + 1\n" * 300)
    return ["train", "charlm", "--data", str(text), "--hidden", "16", "--steps", str(steps),
            "--batch-size", "4", "--seq-len", "20", "--eval-every", "2", "--precision",
            precision_name, "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")]


@needs_bf16
def test_train_charlm_in_bf16_saves_float32_master_weights_and_resumes(tmp_path, capsys):
    from safetensors.torch import load_file

    from rnnkit.cli import main

    assert main(_charlm_args(tmp_path, 3, "bf16")) == 0
    assert main([*_charlm_args(tmp_path, 5, "bf16"), "--resume"]) == 0
    assert "resuming from step 3 of 5" in capsys.readouterr().out
    weights = load_file(str(sorted((tmp_path / "run").glob("checkpoint-*.safetensors"))[-1]))
    model = {k: v for k, v in weights.items() if k.startswith("model/")}
    assert model and all(v.dtype == torch.float32 for v in model.values())
    # the carried state of a bf16 run (bf16, as torch.nn's LSTM returns it) fits a float32 resume
    assert main([*_charlm_args(tmp_path, 6, "fp32"), "--resume"]) == 0


def test_train_bf16_refused_on_a_cpu_without_bf16(tmp_path, monkeypatch, capsys):
    from rnnkit.cli import main

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"fpu", "avx2"}))
    precision.bf16_missing.cache_clear()
    try:
        assert main(_charlm_args(tmp_path, 2, "bf16")) == 2
    finally:
        precision.bf16_missing.cache_clear()
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("rnnkit train: error: train.precision is bf16, but this CPU "
                                 "has no bfloat16 instructions"), errors
    assert not any("Traceback" in line for line in errors)


@needs_bf16
@pytest.mark.parametrize("kind", [1, 2])  # LSTM, GRU reset-after
def test_opcheck_bf16_mode(kind):
    """torch.library's checks of layer_forward with bf16=True: schema, fake kernel, autograd."""
    from rnnkit.engine.fused import _build

    ops = _build.load()
    gen = torch.Generator().manual_seed(0)
    rows = (4 if kind == 1 else 3) * 5

    def rand(*shape):
        return torch.rand(*shape, generator=gen).sub(0.5).requires_grad_()

    args = (kind, 0, False, False, False, rand(4, 3, 2), rand(3, 5),
            rand(3, 5) if kind == 1 else None, rand(rows, 2), rand(rows, 5), rand(rows),
            rand(rows), None, None, None, None, [], True, 1, True)
    torch.library.opcheck(ops.layer_forward.default, args)


def test_float64_layer_is_left_alone_by_autocast():
    """Autocast lowers float32 only (as torch's ops): a float64 layer runs float64."""
    torch.manual_seed(8)
    module = rnnkit.LSTM(3, 4, peephole=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with autocast():
        out, (h, c) = module(x)
    assert out.dtype == h.dtype == c.dtype == torch.float64
    assert torch.equal(out, module(x)[0])


@needs_bf16
def test_cells_run_bf16_mode_and_keep_float32_state():
    torch.manual_seed(9)
    cell = rnnkit.GRUCell(6, 10, reset="before")
    x, h = torch.randn(3, 6), torch.randn(3, 10)
    want, _ = cell(x, h)
    with autocast():
        got, (state,) = cell(x, h)
    assert got.dtype == state.dtype == torch.float32
    assert 0 < (got - want).abs().max() < 3e-2  # rounded GEMM inputs, not the float32 kernel


@needs_bf16
def test_packed_bf16_sequence_under_autocast():
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(10)
    module = rnnkit.LSTM(4, 8, bidirectional=True)
    x = torch.randn(6, 3, 4).to(torch.bfloat16)
    with autocast():
        out, (h, _) = module(pack_padded_sequence(x, [6, 4, 2]))
    want, _ = module(pack_padded_sequence(x.float(), [6, 4, 2]))
    assert out.data.dtype == h.dtype == torch.bfloat16
    torch.testing.assert_close(out.data.float(), want.data, atol=3e-2, rtol=0)


@needs_bf16
@pytest.mark.parametrize("dropout", [False, True])
def test_backward_is_bf16_gemm_inputs_with_float32_accumulation(dropout):
    """The weight and input gradients are products of bf16-rounded operands (the gate gradient,
    x, the previous hidden states h_{t-1} (times the recurrent-dropout mask), the weights)
    accumulated in float32: an Elman layer's backward written out in float64 from the kernel's
    own float32 outputs. 70 inputs, 67 hidden units and T*B = 65 rows give the transposed
    copies full row blocks (32 rows), partial ones and padding (full 256-column tiles: the GRU
    test below); the float32 kernel is measurably farther away."""
    from rnnkit.engine import run_layer
    from rnnkit.engine.regularise import StepMasks

    torch.manual_seed(11)
    module = rnnkit.RNN(70, 67)
    steps, batch = 5, 13
    x = torch.randn(steps, batch, 70, requires_grad=True)
    h0 = torch.randn(batch, 67, requires_grad=True)
    gy = torch.randn(steps, batch, 67)
    mask = (torch.rand(batch, 67) > 0.3).float() / 0.7 if dropout else None
    masks = StepMasks(recurrent=mask) if dropout else None
    params = module.layer_params(0, 0)
    w_ih, w_hh = module.weight_ih_l0, module.weight_hh_l0

    def kernel(mixed: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out, _ = run_layer(module.math, x, (h0,), params, masks=masks)
        assert out.dtype == torch.float32
        return out, torch.autograd.grad(out, [x, h0, w_ih, w_hh, module.bias_ih_l0], gy)

    out, got = kernel(True)
    y = out.detach().double()
    m = mask.double() if dropout else 1.0
    hprev = [h0.detach().double(), *y[:-1]]
    dx = torch.zeros(steps, batch, 70, dtype=torch.float64)
    dw_ih = torch.zeros(67, 70, dtype=torch.float64)
    dw_hh = torch.zeros(67, 67, dtype=torch.float64)
    dh = torch.zeros(batch, 67, dtype=torch.float64)
    db = torch.zeros(67, dtype=torch.float64)  # (the bias's gradient: dG's sum, not rounded)
    for t in reversed(range(steps)):
        dg = (dh + gy[t].double()) * (1 - y[t] ** 2)
        db += dg.sum(0)
        dg = bf16(dg)
        dx[t] = dg @ bf16(w_ih)
        dw_ih += dg.T @ bf16(x[t])
        dw_hh += dg.T @ bf16(hprev[t] * m)
        dh = (dg @ bf16(w_hh)) * m
    for g, w in zip(got, [dx, dh, dw_ih, dw_hh, db]):
        assert rel_err(g, w) < 2e-4, rel_err(g, w)
    _, plain = kernel(False)
    assert max(rel_err(g, w) for g, w in zip(plain[:4], [dx, dh, dw_ih, dw_hh])) > 1e-3


@needs_bf16
@pytest.mark.parametrize("name", ["gru_after", "lstm_peephole"])
def test_partial_gradients_equal_the_full_backward(name):
    """Only dx (frozen weights) or only the weights' gradients (x without grad): the backward's
    bf16 copies of dG are made by other paths then (its rows alone, or its VNNI pack without
    them), and give exactly what the full backward gives."""
    cls, options = LAYER_VARIANTS[name]
    torch.manual_seed(12)
    module = cls(70, 67, **options)
    x = torch.randn(5, 13, 70)
    params = list(module.parameters())

    def grads(wrt):
        with autocast():
            out, _ = module(x)
        return torch.autograd.grad(out.float().pow(2).sum(), wrt)

    x.requires_grad_()
    full = grads([x, *params])
    for p in params:
        p.requires_grad_(False)
    (dx,) = grads([x])
    assert torch.equal(dx, full[0])
    x.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    for got, want in zip(grads(params), full[1:]):
        assert torch.equal(got, want)


@needs_bf16
def test_gru_after_backward_is_bf16_gemm_inputs_with_float32_accumulation():
    """GRU reset-after's backward against the same float64 emulation as the Elman test above:
    dW_hh's r and z columns and b_hh's gradient come from dG itself (the kernel packs only the
    n block of d(W_hh h + b_hh) again). 257 inputs, 260 hidden units and T*B = 65 rows give the
    transposed copies of x and h_{t-1} full tiles (32 rows x 256 columns), partial ones and
    padding; the float32 kernel is measurably farther away."""
    torch.manual_seed(13)
    inputs, hidden, steps, batch = 257, 260, 5, 13
    module = rnnkit.GRU(inputs, hidden)
    x = torch.randn(steps, batch, inputs, requires_grad=True)
    h0 = torch.randn(batch, hidden, requires_grad=True)
    gy = torch.randn(steps, batch, hidden)
    params = module.layer_params(0, 0)
    weights = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]

    def kernel(mixed: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out, _ = run_layer(module.math, x, (h0,), params)
        assert out.dtype == torch.float32
        return out, torch.autograd.grad(out, [x, h0, *weights], gy)

    out, got = kernel(True)
    y = out.detach().double()
    w_ih, w_hh, b_ih, b_hh = (w.detach().double() for w in weights)
    hprev = [h0.detach().double(), *y[:-1]]
    H = hidden
    dx = torch.zeros(steps, batch, inputs, dtype=torch.float64)
    dw_ih, dw_hh = torch.zeros_like(w_ih), torch.zeros_like(w_hh)
    db_ih, db_hh = torch.zeros_like(b_ih), torch.zeros_like(b_hh)
    dh = torch.zeros(batch, H, dtype=torch.float64)
    for t in reversed(range(steps)):
        # the gates from the kernel's own h_{t-1}, products of bf16-rounded operands
        gx = bf16(x[t].detach()) @ bf16(w_ih).T + b_ih
        gh = bf16(hprev[t]) @ bf16(w_hh).T + b_hh
        r = torch.sigmoid(gx[:, :H] + gh[:, :H])
        z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
        d = dh + gy[t].double()
        dpn = d * (1 - z) * (1 - n ** 2)
        dpz = d * (hprev[t] - n) * z * (1 - z)
        dpr = dpn * gh[:, 2 * H:] * r * (1 - r)
        dg_x = torch.cat([dpr, dpz, dpn], 1)
        dg_h = torch.cat([dpr, dpz, dpn * r], 1)
        db_ih += dg_x.sum(0)
        db_hh += dg_h.sum(0)
        dg_x, dg_h = bf16(dg_x), bf16(dg_h)
        dx[t] = dg_x @ bf16(w_ih)
        dw_ih += dg_x.T @ bf16(x[t].detach())
        dw_hh += dg_h.T @ bf16(hprev[t])
        dh = d * z + dg_h @ bf16(w_hh)
    want = [dx, dh, dw_ih, dw_hh, db_ih, db_hh]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-4, rel_err(g, w)
    _, plain = kernel(False)
    assert max(rel_err(g, w) for g, w in zip(plain[:4], want)) > 1e-3
