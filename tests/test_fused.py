"""The fused C++ backend against a plain-torch reference written here, and against torch.nn.

The reference is a per-step loop of torch ops with the cell equations, masked by batch_sizes;
autograd through it gives the gradients the fused hand-derived backward must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from rnnkit.engine import fused
from rnnkit.engine.fused import _function


@dataclass(frozen=True)
class Spec:
    kind: str
    nonlinearity: str = "tanh"
    peephole: bool = False
    coupled: bool = False
    reset: str = "after"


VARIANTS = {
    "rnn_tanh": Spec("rnn"),
    "rnn_relu": Spec("rnn", nonlinearity="relu"),
    "rnn_sigmoid": Spec("rnn", nonlinearity="sigmoid"),
    "lstm": Spec("lstm"),
    "lstm_peephole": Spec("lstm", peephole=True),
    "lstm_coupled": Spec("lstm", coupled=True),
    "lstm_coupled_peephole": Spec("lstm", peephole=True, coupled=True),
    "gru_after": Spec("gru"),
    "gru_before": Spec("gru", reset="before"),
}

pytestmark = pytest.mark.skipif(
    fused.unavailable_reason(Spec("gru"), torch.float32, "cpu") is not None,
    reason=f"fused backend unavailable: {fused.unavailable_reason(Spec('gru'), torch.float32, 'cpu')}",
)


def num_gates(spec: Spec) -> int:
    if spec.kind == "rnn":
        return 1
    if spec.kind == "lstm":
        return 3 if spec.coupled else 4
    return 3


def num_peephole(spec: Spec) -> int:
    if spec.kind != "lstm" or not spec.peephole:
        return 0
    return 2 if spec.coupled else 3


# ---- reference ------------------------------------------------------------------------------


def reference_step(spec: Spec, x, state, params):
    w_ih, w_hh, b_ih, b_hh, *peep = params
    h = state[0]
    gx = x @ w_ih.t() + (0 if b_ih is None else b_ih)
    gh = h @ w_hh.t() + (0 if b_hh is None else b_hh)
    if spec.kind == "rnn":
        act = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}
        return (act[spec.nonlinearity](gx + gh),)
    if spec.kind == "lstm":
        c = state[1]
        pre = gx + gh
        if spec.coupled:
            p_i, p_g, p_o = pre.chunk(3, 1)
            w_ci, w_co = peep if spec.peephole else (0, 0)
            i = torch.sigmoid(p_i + w_ci * c)
            f = 1 - i
        else:
            p_i, p_f, p_g, p_o = pre.chunk(4, 1)
            w_ci, w_cf, w_co = peep if spec.peephole else (0, 0, 0)
            i = torch.sigmoid(p_i + w_ci * c)
            f = torch.sigmoid(p_f + w_cf * c)
        g = torch.tanh(p_g)
        c_new = f * c + i * g
        o = torch.sigmoid(p_o + w_co * c_new)
        return o * torch.tanh(c_new), c_new
    x_r, x_z, x_n = gx.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    if spec.reset == "after":
        n = torch.tanh(x_n + r * h_n)
    else:
        hidden = h.shape[1]
        w_hn = w_hh[2 * hidden :]
        b_hn = 0 if b_hh is None else b_hh[2 * hidden :]
        n = torch.tanh(x_n + (r * h) @ w_hn.t() + b_hn)
    return ((1 - z) * n + z * h,)


def reference(spec: Spec, x, state0, params, batch_sizes):
    steps, batch, _ = x.shape
    state = list(state0)
    outputs = []
    for t in range(steps):
        new = reference_step(spec, x[t], state, params)
        if batch_sizes is None:
            state = list(new)
            outputs.append(new[0])
            continue
        active = (torch.arange(batch) < batch_sizes[t]).unsqueeze(1)
        state = [torch.where(active, n, s) for n, s in zip(new, state)]
        outputs.append(torch.where(active, new[0], torch.zeros_like(new[0])))
    return torch.stack(outputs), tuple(state)


# ---- helpers -----------------------------------------------------------------------------------


def make_inputs(spec: Spec, steps, batch, inputs, hidden, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.rand(*shape, generator=gen, dtype=dtype) * 2 - 1) * scale
        return t.requires_grad_()

    rows = num_gates(spec) * hidden
    k = hidden**-0.5
    x = rand(steps, batch, inputs)
    state0 = tuple(rand(batch, hidden) for _ in range(2 if spec.kind == "lstm" else 1))
    params = [rand(rows, inputs, scale=k), rand(rows, hidden, scale=k)]
    params += [rand(rows, scale=k), rand(rows, scale=k)] if bias else [None, None]
    params += [rand(hidden, scale=0.5) for _ in range(num_peephole(spec))]
    return x, state0, tuple(params)


def leaves(x, state0, params):
    return [t for t in (x, *state0, *params) if t is not None]


def outputs_and_grads(run, spec, x, state0, params, batch_sizes, seed=1):
    out, state = run(spec, x, state0, params, batch_sizes)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (out, *state)]
    loss = sum((w * t).sum() for w, t in zip(weights, (out, *state)))
    grads = torch.autograd.grad(loss, leaves(x, state0, params))
    return [out.detach(), *(s.detach() for s in state)], list(grads)


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


BATCH_SIZES = [5, 5, 4, 4, 2, 1, 1]  # T = 7, B = 5
# Row 4 never runs (keeps its initial state) and no row runs at the last step.
BATCH_SIZES_EMPTY_ROWS = [4, 4, 3, 2, 1, 1, 0]
LENGTHS = {"full": None, "lengths": BATCH_SIZES, "empty_rows": BATCH_SIZES_EMPTY_ROWS}


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_reference(name, lengths, bias, dtype):
    spec = VARIANTS[name]
    batch_sizes = LENGTHS[lengths]
    args = make_inputs(spec, 7, 5, 6, 9, dtype, bias=bias)
    got_out, got_grads = outputs_and_grads(fused.run_layer, spec, *args, batch_sizes)
    want_out, want_grads = outputs_and_grads(reference, spec, *args, batch_sizes)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.fixture
def batch_split(monkeypatch):
    """The kernels' time loops on 2 threads, each on a block of the batch rows (the plain LSTM
    on rnnkit's kernel, not torch's op)."""
    monkeypatch.setattr(_function, "loop_threads", 2)
    monkeypatch.setattr(fused, "use_native", False)
    with fused.thread_split("batch"):
        yield


@pytest.mark.parametrize("split", ["hidden", "batch"])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_thread_split_matches_reference(name, threads, split, monkeypatch):
    """hidden: hidden sizes that split unevenly (and leave a thread without units) across
    threads; batch: 5 rows in blocks of 3 + 2 or 2 + 2 + 1, with lengths that end some rows."""
    monkeypatch.setattr(_function, "loop_threads", threads)
    monkeypatch.setattr(fused, "use_native", False)
    spec = VARIANTS[name]
    args = make_inputs(spec, 6, 5, 7, 37 if threads == 2 else 20, torch.float64)
    for batch_sizes in (None, [5, 4, 4, 3, 1, 1]):
        with fused.thread_split(split):
            got_out, got_grads = outputs_and_grads(fused.run_layer, spec, *args, batch_sizes)
        want_out, want_grads = outputs_and_grads(reference, spec, *args, batch_sizes)
        for got, want in zip(got_out + got_grads, want_out + want_grads):
            torch.testing.assert_close(got, want, **tolerance(torch.float64))


@pytest.mark.parametrize("batch", [1, 3, 33])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_batch_split_equals_the_one_thread_kernel(name, lengths, batch, batch_split,
                                                  monkeypatch):
    """Each row runs the one-thread loop's arithmetic: at batch 33 (blocks of 16-17 rows) the
    same bits, but for the peephole weights' gradients, summed over the rows block by block;
    with fewer rows a block's per-step product may have 1 row where the whole batch has 2 or
    more (another micro-kernel of the GEMM, the sums in another order): <= 1e-6 apart."""
    spec = VARIANTS[name]
    batch_sizes = None
    if lengths:  # (the longest rows in the first block; the last row never runs if batch > 1)
        top = max(1, batch - 1)
        batch_sizes = [top] * 3 + [max(1, batch * 2 // 3), max(1, batch // 3), 1, 0]
    args = make_inputs(spec, 7, batch, 6, 40, torch.float32)
    got_out, got_grads = outputs_and_grads(fused.run_layer, spec, *args, batch_sizes)
    monkeypatch.setattr(_function, "loop_threads", 1)
    want_out, want_grads = outputs_and_grads(fused.run_layer, spec, *args, batch_sizes)
    peephole = set(range(len(want_grads) - num_peephole(spec), len(want_grads)))
    for i, (got, want) in enumerate(zip(got_out + got_grads, want_out + want_grads)):
        exact = batch == 33 and i - len(want_out) not in peephole
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inference_path_matches_training_path(name):
    spec = VARIANTS[name]
    x, state0, params = make_inputs(spec, 6, 4, 5, 8, torch.float32)
    train_out, train_state = fused.run_layer(spec, x, state0, params, [4, 4, 3, 2, 2, 1])
    with torch.no_grad():
        out, state = fused.run_layer(spec, x, state0, params, [4, 4, 3, 2, 2, 1])
    assert not out.requires_grad
    torch.testing.assert_close(out, train_out.detach(), rtol=0, atol=0)
    for s, t in zip(state, train_state):
        torch.testing.assert_close(s, t.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("split", [None, "batch"], ids=["one_thread", "batch_split"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradcheck(name, split, request):
    if split:
        request.getfixturevalue("batch_split")  # (3 rows: blocks of 2 + 1)
    spec = VARIANTS[name]
    x, state0, params = make_inputs(spec, 4, 3, 2, 3, torch.float64)
    tensors = leaves(x, state0, params)
    num_states = len(state0)

    def run(*flat):
        xs, rest = flat[0], flat[1:]
        st, ps = rest[:num_states], list(rest[num_states:])
        ps = ps[:2] + ps[2:4] + ps[4:]
        out, state = fused.run_layer(spec, xs, tuple(st), tuple(ps), [3, 2, 2, 1])
        return (out, *state)

    assert torch.autograd.gradcheck(run, tuple(tensors))


def test_only_some_inputs_need_grad():
    spec = VARIANTS["lstm_peephole"]
    x, state0, params = make_inputs(spec, 5, 3, 4, 6, torch.float64)
    x = x.detach()
    state0 = tuple(s.detach() for s in state0)
    out, (_, c) = fused.run_layer(spec, x, state0, params, None)
    (out.sum() + c.sum()).backward()
    want = make_inputs(spec, 5, 3, 4, 6, torch.float64)[2]
    w_out, (_, w_c) = reference(spec, x, state0, want, None)
    (w_out.sum() + w_c.sum()).backward()
    for p, q in zip(params, want):
        torch.testing.assert_close(p.grad, q.grad, **tolerance(torch.float64))


# ---- against torch.nn ------------------------------------------------------------------------


def torch_module_params(module):
    return (module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0)


@pytest.mark.parametrize(
    ("name", "module_cls", "kwargs"),
    [
        ("lstm", torch.nn.LSTM, {}),
        ("gru_after", torch.nn.GRU, {}),
        ("rnn_tanh", torch.nn.RNN, {"nonlinearity": "tanh"}),
        ("rnn_relu", torch.nn.RNN, {"nonlinearity": "relu"}),
    ],
)
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("split", [None, "batch"], ids=["default", "batch_split"])
def test_matches_torch_nn(name, module_cls, kwargs, lengths, split, request):
    if split:
        request.getfixturevalue("batch_split")  # (5 rows: blocks of 3 + 2)
    torch.manual_seed(0)
    spec = VARIANTS[name]
    steps, batch, inputs, hidden = 7, 5, 6, 8
    module = module_cls(inputs, hidden, **kwargs)
    x = torch.randn(steps, batch, inputs, requires_grad=True)
    state0 = tuple(
        torch.randn(batch, hidden, requires_grad=True) for _ in range(2 if spec.kind == "lstm" else 1)
    )
    params = torch_module_params(module)
    batch_sizes = BATCH_SIZES if lengths else None
    out, state = fused.run_layer(spec, x, state0, params, batch_sizes)

    hx = tuple(s.unsqueeze(0) for s in state0)
    hx = hx if spec.kind == "lstm" else hx[0]
    if lengths:
        lens = torch.tensor([sum(b > i for b in BATCH_SIZES) for i in range(batch)])
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens)
        want_p, want_state = module(packed, hx)
        want, _ = torch.nn.utils.rnn.pad_packed_sequence(want_p, total_length=steps)
    else:
        want, want_state = module(x, hx)
    want_state = want_state if spec.kind == "lstm" else (want_state,)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for s, w in zip(state, want_state):
        torch.testing.assert_close(s, w[0], rtol=1e-5, atol=1e-5)
    tensors = [x, *state0, *params]
    got = torch.autograd.grad(out.sum() + sum(s.sum() for s in state), tensors)
    wanted = torch.autograd.grad(want.sum() + sum(s.sum() for s in want_state), tensors)
    for g, w in zip(got, wanted):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_unavailable_reasons():
    assert fused.unavailable_reason(VARIANTS["lstm"], torch.float32, "meta") == "device meta"
    assert "dtype" in fused.unavailable_reason(VARIANTS["gru_after"], torch.float16, "cpu")
    assert "kind" in fused.unavailable_reason(Spec("transformer"), torch.float32, "cpu")
    assert fused.unavailable_reason(VARIANTS["gru_before"], torch.float64, "cpu") is None


@pytest.mark.parametrize("shape", [(1, 1), (3, 4)], ids=["step", "short"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_short_inputs_use_weights_as_stored(name, shape):
    """Few rows (T * B < 16) take the path without transposed weight copies."""
    spec = VARIANTS[name]
    steps, batch = shape
    args = make_inputs(spec, steps, batch, 6, 9, torch.float64)
    got_out, got_grads = outputs_and_grads(fused.run_layer, spec, *args, None)
    want_out, want_grads = outputs_and_grads(reference, spec, *args, None)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))
    with torch.no_grad():
        out, state = fused.run_layer(spec, *args, None)
    for got, want in zip((out, *state), want_out):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


def test_plain_lstm_goes_to_torchs_op_only_where_it_is_faster(monkeypatch, builtin_routes):
    spec = VARIANTS["lstm"]
    assert fused.own_kernel_faster(1, 1, 256) and fused.own_kernel_faster(1, 1, 256, threads=1)
    assert fused.own_kernel_faster(200, 1, 64, 2) and fused.own_kernel_faster(35, 20, 64, 2)
    assert not fused.own_kernel_faster(200, 1, 64, 1)  # measured: one thread, torch's op wins
    assert not fused.own_kernel_faster(35, 20, 200, 2)
    assert not fused.own_kernel_faster(200, 1, 256, 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert fused.native_op(spec, torch.zeros(200, 1, 64), 64) is None
    assert fused.native_op(spec, torch.zeros(35, 20, 200), 200) is not None
    assert fused.native_op(VARIANTS["lstm_peephole"], torch.zeros(35, 20, 200), 200) is None


def test_missing_compiler_gives_a_reason(monkeypatch):
    from rnnkit.engine.fused import _build
    from rnnkit.native import NativeExtension

    fresh = NativeExtension(_build.EXTENSION.name, _build.EXTENSION.sources)  # not yet loaded
    monkeypatch.setattr(_build, "EXTENSION", fresh)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert _build.load() is None
    reason = "C++ compiler '/nonexistent/c++' not found"
    assert _build.error() == reason
    assert fused.unavailable_reason(VARIANTS["gru_after"], torch.float32, "cpu") == reason
    # torch's own op still serves the plain LSTM
    assert fused.unavailable_reason(VARIANTS["lstm"], torch.float32, "cpu") is None
    x, state0, params = make_inputs(VARIANTS["lstm"], 6, 6, 4, 5, torch.float32)
    out, _ = fused.run_layer(VARIANTS["lstm"], x, state0, params, None)
    assert out.shape == (6, 6, 5)


# ---- the BPTT engine's time chunks for a ragged batch (the projected LSTM) -----------------------


def test_chunk_plan_covers_the_running_steps_at_least_cost():
    from itertools import combinations, pairwise

    bs = [6, 6, 5, 5, 5, 3, 2, 2, 1, 0]
    for cost in (0.0, 2.0, 5.0, 1e9):
        plan = fused.chunk_plan(bs, cost)
        assert plan[0][0] == 0 and plan[-1][1] == 9  # (the step where no row runs is left out)
        assert all(a[1] == b[0] for a, b in pairwise(plan))
        assert all(rows == bs[start] for start, _, rows in plan)
        total = sum((stop - start) * rows + cost for start, stop, rows in plan)
        changes = [2, 5, 6, 8]  # brute force over every subset of the places bs changes
        best = min(
            sum((b - a) * bs[a] + cost for a, b in zip((0, *cut), (*cut, 9)))
            for k in range(len(changes) + 1) for cut in combinations(changes, k))
        assert total == best
    assert fused.chunk_plan(bs, 1e9) == [(0, 9, 6)]
    assert len(fused.chunk_plan(bs, 0.0)) == 5
    many = list(range(300, 0, -1))  # B = 300 rows ending one per step: candidates capped
    plan = fused.chunk_plan(many, 0.0)
    assert len(plan) == fused.MAX_CHUNK_STARTS and plan[0][0] == 0 and plan[-1][1] == 300
    assert all(rows == many[start] for start, _, rows in plan)


# ---- a ragged batch in one kernel call: its products over the rows that ran only -------------

# a full step first then ties, no full step (a row that never runs, a step with none), one row
RAGGED = {"first_full": [5, 3, 3, 3, 3, 3, 3], "first_partial": [4, 4, 3, 2, 1, 1, 0],
          "one_row": [5, 1, 1, 1, 1, 1, 1]}


@pytest.mark.parametrize("batch_sizes", list(RAGGED))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_ragged_batch_runs_the_kernel_once_and_matches_reference(name, batch_sizes,
                                                                 monkeypatch):
    """One kernel call whatever the batch sizes (no time chunks in Python), values and
    gradients as the reference engine's."""
    calls = []
    run = fused.run
    monkeypatch.setattr(fused, "run", lambda *a, **k: calls.append(a[1]) or run(*a, **k))
    spec = VARIANTS[name]
    bs = RAGGED[batch_sizes]
    args = make_inputs(spec, 7, 5, 6, 9, torch.float64)
    got_out, got_grads = outputs_and_grads(fused.run_layer, spec, *args, bs)
    assert calls == [bs]
    want_out, want_grads = outputs_and_grads(reference, spec, *args, bs)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ragged_gradcheck(name):
    """The hand-derived backward of a ragged batch (products over the packed rows) in float64."""
    spec = VARIANTS[name]
    x, state0, params = make_inputs(spec, 5, 4, 3, 3, torch.float64)
    tensors = leaves(x, state0, params)
    states = len(state0)

    def run(*flat):
        out, state = fused.run_layer(spec, flat[0], tuple(flat[1:1 + states]),
                                     tuple(flat[1 + states:]), [3, 3, 2, 1, 1])
        return (out, *state)

    assert torch.autograd.gradcheck(run, tuple(tensors))


def _own_gemm_runs() -> bool:
    ops = torch.ops.rnnkit_fused
    saved = ops.set_gemm("auto")
    try:
        return ops.set_gemm("own") == "own"
    finally:
        ops.set_gemm(saved)


@pytest.mark.parametrize("split", [None, "batch"], ids=["one_thread", "batch_split"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_few_running_rows_equal_the_full_batch_bit_for_bit(name, split, request, monkeypatch):
    """Under gemm_own, a step's recurrent products over 1-3 running rows (few_rows_strips in
    gemm.h: several 16-column strips per tile) form each output as the same chain of FMAs as
    gemm_own's tiles do over the whole batch: a ragged batch's outputs and input gradients over
    the steps its rows run are the padded call's, bit for bit. H = 40: whole strips in groups
    and alone, and a narrower last strip (the backward's dh has H columns)."""
    if not _own_gemm_runs():
        pytest.skip("needs rnnkit's AVX2 GEMM (gemm_own)")
    monkeypatch.setattr(fused, "use_native", False)  # (the plain LSTM on rnnkit's kernel)
    if split:
        request.getfixturevalue("batch_split")
    spec = VARIANTS[name]
    bs = [8, 3, 3, 2, 1, 1, 1]  # rows 1-2 end at steps 3 and 4, row 0 runs alone after
    x, state0, params = make_inputs(spec, 7, 8, 6, 40, torch.float32)
    running = (torch.arange(8) < torch.tensor(bs).unsqueeze(1)).unsqueeze(2)  # (T, B, 1)
    gy = torch.randn(7, 8, 40, generator=torch.Generator().manual_seed(2)) * running

    def run(batch_sizes):
        out, _ = fused.run_layer(spec, x, state0, params, batch_sizes)
        (dx,) = torch.autograd.grad((out * gy).sum(), [x])
        return out.detach() * running, dx * running

    ragged, padded = run(bs), run(None)
    for got, want in zip(ragged, padded):
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_kernel_never_reads_the_padding(name, dtype):
    """NaN and inf in the padding of x (which the kernel gets as it is: no zero_padding pass
    first) change no output and no gradient, and the padding's gradient is exactly 0."""
    spec = VARIANTS[name]
    bs = RAGGED["first_partial"]
    x, state0, params = make_inputs(spec, 7, 5, 6, 9, dtype)
    running = (torch.arange(5) < torch.tensor(bs).unsqueeze(1)).unsqueeze(2)  # (T, B, 1)
    poison = torch.tensor([float("nan"), float("inf")], dtype=dtype).repeat(3)
    dirty = torch.where(running, x.detach(), poison).requires_grad_()
    clean_out, clean_grads = outputs_and_grads(fused.run_layer, spec, x, state0, params, bs)
    dirty_out, dirty_grads = outputs_and_grads(fused.run_layer, spec, dirty, state0, params, bs)
    for got, want in zip(dirty_out + dirty_grads, clean_out + clean_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert bool((dirty_grads[0].masked_select(~running) == 0).all())
    assert bool((dirty_out[0].masked_select(~running) == 0).all())  # the output's padding


def test_plain_lstm_with_lengths_runs_rnnkits_kernel_not_torchs_packed_op(builtin_routes):
    """torch's packed op is 2.5-7x slower than its padded op (benchmarks/lengths.py)."""
    spec = VARIANTS["lstm"]
    x = torch.zeros(35, 20, 200)
    assert fused.native_op(spec, x, 200) is not None  # padded: torch's op at this shape
    assert fused.native_op(spec, x, 200, [20] * 30 + [10] * 5) is None
    assert fused.native_op(spec, x, 200, [20] * 35) is not None  # not ragged
