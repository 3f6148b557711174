"""The fused kernels as torch operators: opcheck, torch.compile(fullgraph=True), torch.export.

Correctness of the kernels themselves is tests/test_fused.py; here: that torch's tools see one
``rnnkit_fused::layer_forward`` per layer and direction and get the eager results and gradients.
"""

from __future__ import annotations

import io

import pytest
import torch

import rnnkit
from conftest import LAYER_VARIANTS
from rnnkit.cells import CellSpec
from rnnkit.engine import fused
from rnnkit.engine.fused import _build, _function, _layer_norm
from rnnkit.engine.fused import inference as fused_inference

pytestmark = pytest.mark.skipif(
    fused.unavailable_reason(CellSpec("gru"), torch.float32, "cpu") is not None,
    reason=f"fused backend unavailable: {fused.unavailable_reason(CellSpec('gru'), torch.float32, 'cpu')}",
)



def ops():
    return _build.load()


def _config(name):
    cls, options = LAYER_VARIANTS[name]
    return _function.config_of(cls(2, 5, **options).math)


def _operator_args(cfg, dtype=torch.float64, batch_sizes=(), training=True, grad=True,
                   masks=False):
    """layer_forward's arguments for a small random problem: T=4, B=3, I=2, H=5 (``masks``:
    with recurrent-dropout and zoneout masks)."""
    gen = torch.Generator().manual_seed(0)
    rows = {0: 1, 1: 3 if cfg.coupled else 4, 2: 3}[cfg.kind] * 5

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=dtype).sub(0.5).requires_grad_(grad)

    c0 = rand(3, 5) if cfg.kind == 1 else None
    peep = rand(cfg.num_peephole, 5) if cfg.num_peephole else None
    recurrent = keep_h = keep_c = None
    if masks:
        recurrent = (torch.rand(3, 5, generator=gen, dtype=dtype) > 0.3).to(dtype) / 0.7
        keep_h = (torch.rand(4, 3, 5, generator=gen, dtype=dtype) < 0.3).to(dtype)
        keep_c = (torch.rand(4, 3, 5, generator=gen, dtype=dtype) < 0.3).to(dtype) \
            if cfg.kind == 1 else None
    return (*cfg.args(), rand(4, 3, 2), rand(3, 5), c0, rand(rows, 2), rand(rows, 5), rand(rows),
            rand(rows), peep, recurrent, keep_h, keep_c, list(batch_sizes), training, 0)


@pytest.mark.parametrize("name", list(LAYER_VARIANTS))
def test_opcheck_layer_forward(name):
    cfg = _config(name)
    for batch_sizes in ((), (3, 3, 2, 1)):
        torch.library.opcheck(ops().layer_forward.default, _operator_args(cfg, batch_sizes=batch_sizes))
        torch.library.opcheck(ops().layer_forward.default,
                              _operator_args(cfg, batch_sizes=batch_sizes, masks=True))
    torch.library.opcheck(ops().layer_forward.default, _operator_args(cfg, training=False, grad=False))


@pytest.mark.parametrize("name", ["lstm_peephole_coupled", "gru_after", "rnn_relu"])
def test_opcheck_layer_backward_and_step(name):
    cfg = _config(name)
    args = _operator_args(cfg, grad=False)
    x, h0, c0, w_ih, w_hh, b_ih, _, peep = args[5:13]
    y, h, c, acts, cells, extra = ops().layer_forward(*args)
    lstm = cfg.kind == 1
    backward_args = (*cfg.args(), x, h0, c0, w_ih, w_hh, peep, None, None, None, True, [], y,
                     acts, cells, extra,
                     torch.randn_like(y), torch.randn_like(h), torch.randn_like(c) if lstm else None,
                     True, True, 0)
    torch.library.opcheck(ops().layer_backward.default, backward_args)
    step_args = (*cfg.args(), x[0], h0, c0, w_ih, w_hh, b_ih, args[11], peep, 0)
    torch.library.opcheck(ops().step.default, step_args)
    # the step operator is the layer of length 1
    got = ops().step(*step_args)
    want = ops().layer_forward(*args[:5], x[:1], *args[6:])
    torch.testing.assert_close(got[0], want[1])
    torch.testing.assert_close(got[1], want[2])


@pytest.mark.parametrize("name, position, short, message", [
    ("gru_after", 11, torch.rand(3, dtype=torch.float64), "b_ih and b_hh must be"),
    ("lstm", 10, torch.rand(19, dtype=torch.float64), "b_ih and b_hh must be"),
    ("lstm", 11, None, "both or neither"),
    ("lstm_peephole", 12, torch.rand(3, 4, dtype=torch.float64), "peephole weights must be"),
    ("lstm_peephole_coupled", 12, torch.rand(3, 5, dtype=torch.float64),
     "peephole weights must be"),
    ("rnn_tanh", 10, torch.rand(5, dtype=torch.float32), "b_ih and b_hh must be")])
def test_short_biases_or_peepholes_are_refused_not_read_past(name, position, short, message):
    """The loops read G*H values of each bias and H of each peephole row through raw pointers:
    a direct operator call with a shorter tensor read past its end and returned numbers that
    changed from call to call (review, session 12); now it names the tensor."""
    args = list(_operator_args(_config(name), grad=False, training=False))
    args[position] = short
    with pytest.raises(RuntimeError, match=message):
        ops().layer_forward(*args)
    if position == 12:  # the backward reads the peepholes too
        good = list(_operator_args(_config(name), grad=False))
        y, _, _, acts, cells, extra = ops().layer_forward(*good)
        x, h0, c0, w_ih, w_hh = good[5:10]
        backward = (*_config(name).args(), x, h0, c0, w_ih, w_hh, short, None, None, None, True,
                    [], y, acts, cells, extra, torch.ones_like(y), None, None, True, True, 0)
        with pytest.raises(RuntimeError, match=message):
            ops().layer_backward(*backward)


@pytest.mark.parametrize("name, position, wrong, message", [
    ("lstm", 6, torch.rand(1, 5, dtype=torch.float64), "h0 must be"),  # another batch
    ("lstm", 7, torch.rand(3, 6, dtype=torch.float64), "c0 must be"),  # another width
    ("lstm", 7, None, "c0 must be .* got None"),  # none at all
    ("gru_after", 6, torch.rand(3, 5, dtype=torch.float32), "h0 must be"),  # another dtype
    ("rnn_tanh", 6, torch.rand(2, 5, dtype=torch.float64), "h0 must be")])
def test_states_of_another_shape_are_refused_not_read_past(name, position, wrong, message):
    """The loops read and write B*H values of h0 and c0 through raw pointers: a direct operator
    call with h0 of batch 1 for x of batch 4 corrupted the heap (malloc_consolidate abort, review
    of session 15); now it names the state, forward and backward."""
    cfg = _config(name)
    args = list(_operator_args(cfg, grad=False, training=False))
    args[position] = wrong
    with pytest.raises(RuntimeError, match=message):
        ops().layer_forward(*args)
    good = list(_operator_args(cfg, grad=False))
    y, h, _, acts, cells, extra = ops().layer_forward(*good)
    x, h0, c0, w_ih, w_hh = good[5:10]
    states = [h0, c0]
    states[position - 6] = wrong
    backward = [*cfg.args(), x, *states, w_ih, w_hh, good[12], None, None, None, True, [], y,
                acts, cells, extra, torch.ones_like(y), None, None, True, True, 0]
    with pytest.raises(RuntimeError, match=message):
        ops().layer_backward(*backward)
    backward[6:8] = [h0, c0]  # the gradient of the final state: the same check
    backward[21] = torch.ones(h.shape[0] + 1, h.shape[1], dtype=h.dtype)
    with pytest.raises(RuntimeError, match="grad_h_n must be"):
        ops().layer_backward(*backward)
    backward[21] = None
    backward[16] = y[:, :1]  # a saved tensor of another batch
    with pytest.raises(RuntimeError, match="y must be"):
        ops().layer_backward(*backward)


@pytest.mark.parametrize("threads", [-1, 1 << 40])
def test_layer_operators_refuse_a_thread_count_out_of_range(threads):
    """threads is cast to int: 2^40 became 0 loop threads and the backward divided by it (SIGFPE,
    the operator fuzzer of session 15)."""
    cfg = _config("gru_after")
    args = list(_operator_args(cfg, grad=False))
    y, _, _, acts, cells, extra = ops().layer_forward(*args)
    x, h0, c0, w_ih, w_hh = args[5:10]
    backward = [*cfg.args(), x, h0, c0, w_ih, w_hh, None, None, None, None, True, [], y, acts,
                cells, extra, torch.ones_like(y), None, None, True, True, threads]
    with pytest.raises(RuntimeError, match=r"threads must be in \[0, 1024\]"):
        ops().layer_backward(*backward)
    args[-1] = threads
    with pytest.raises(RuntimeError, match=r"threads must be in \[0, 1024\]"):
        ops().layer_forward(*args)
    backward[-1] = 0
    backward[8] = w_ih.float()  # a weight of another dtype: named
    with pytest.raises(RuntimeError, match="w_ih must be"):
        ops().layer_backward(*backward)


def test_increasing_batch_sizes_are_refused():
    """Step t runs the first batch_sizes[t] rows: a row that ended cannot run again."""
    args = list(_operator_args(_config("gru_after"), grad=False))
    args[-3] = [2, 3, 3, 1]
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        ops().layer_forward(*args)


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="no fused kernel"):
        _function.config_of(CellSpec("lstm", reset="before"))
    with pytest.raises(ValueError, match="no fused kernel"):
        _function.config_of(CellSpec("rnn", nonlinearity="gelu"))


def _result_and_grads(module, x):
    out, state = module(x)
    states = state if isinstance(state, tuple) else (state,)
    loss = out.pow(2).sum() + sum(s.sin().sum() for s in states)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [out, *states, *grads]


def _compiled_equals_eager(name, backend, layers=2, bidirectional=True):
    cls, options = LAYER_VARIANTS[name]
    torch.manual_seed(0)
    module = cls(3, 8, num_layers=layers, bidirectional=bidirectional, **options)
    x = torch.randn(6, 4, 3, requires_grad=True)
    want = _result_and_grads(module, x)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    got = _result_and_grads(compiled, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_equals_eager():
    """One representative, traced the way inductor is (AOT autograd) without inductor's codegen."""
    _compiled_equals_eager("lstm_peephole_coupled", "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYER_VARIANTS))
def test_compile_fullgraph_inductor_every_variant(name):
    _compiled_equals_eager(name, "inductor")


@pytest.mark.slow
def test_compile_plain_lstm_through_torch_op():
    """The plain LSTM dispatched to torch._VF.lstm compiles too. (Forced: where that route goes
    is measured per CPU; on the Zen 3 table this shape runs rnnkit's kernel.)"""
    torch.manual_seed(0)
    module = rnnkit.LSTM(16, 64, num_layers=2)
    x = torch.randn(20, 40, 16, requires_grad=True)
    with fused.plain_lstm_path("torch"):
        assert fused.native_op(module.math, x, 64) is not None
        want = _result_and_grads(module, x)
        torch._dynamo.reset()
        got = _result_and_grads(torch.compile(module, fullgraph=True, backend="aot_eager"), x)
    # (AOT autograd decomposes torch's LSTM into per-step ops: float32 sums over 800 rows round
    # differently from oneDNN's)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_export_round_trip():
    torch.manual_seed(0)
    module = rnnkit.GRU(3, 8, num_layers=2, bidirectional=True, reset="before").eval()
    x = torch.randn(6, 4, 3)
    program = torch.export.export(module, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    # one operator per layer and direction
    assert targets.count(torch.ops.rnnkit_fused.layer_forward.default) == 4
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    x2 = torch.randn(6, 4, 3)
    for got, want in zip(loaded.module()(x2), module(x2)):
        torch.testing.assert_close(got, want)


def test_export_plain_lstm_torch_op():
    module = rnnkit.LSTM(8, 64, num_layers=2).eval()
    x = torch.randn(10, 40, 8)
    program = torch.export.export(module, (x,))
    got = program.module()(x)
    want = module(x)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][1], want[1][1])


CELLS = {
    "rnn_sigmoid": lambda: rnnkit.RNNCell(3, 8, nonlinearity="sigmoid"),
    "lstm": lambda: rnnkit.LSTMCell(3, 8),
    "lstm_coupled_peephole": lambda: rnnkit.LSTMCell(3, 8, peephole=True, coupled=True),
    "gru_before": lambda: rnnkit.GRUCell(3, 8, reset="before"),
}


@pytest.mark.parametrize("name", list(CELLS))
def test_inference_step_operator_equals_layer_path(name, monkeypatch):
    """A cell step without gradients runs the ``step`` operator; with gradients, the layer path."""
    torch.manual_seed(0)
    cell = CELLS[name]()
    x = torch.randn(5, 3)
    state = tuple(torch.randn(5, 8) for _ in cell.math.state_names)
    calls = []
    step = fused.run_step
    monkeypatch.setattr(fused, "run_step", lambda *a: calls.append(1) or step(*a))
    lean = fused_inference.cell_step  # (the lean eager step, which calls the operator directly)
    monkeypatch.setattr(fused_inference, "cell_step", lambda *a: calls.append(1) or lean(*a))
    with torch.inference_mode():
        got = cell(x, state)[1]
    assert calls == [1]
    want = cell(x, state)[1]  # parameters require grad: the differentiable layer path
    assert calls == [1] and want[0].grad_fn is not None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), rtol=1e-6, atol=1e-6)


# ---- lengths= in traced graphs: the lengths tensor reaches layer_forward_lengths ---------------

LENGTHS = torch.tensor([4, 6, 1, 6])  # unsorted, one full-length row, one of length 1
# one of each kernel family by default (a compile or export takes ~10 s); every variant: slow
_LENGTHS_FAST = ("lstm_peephole_coupled", "gru_before", "rnn_relu")
EVERY_VARIANT = [pytest.param(name, marks=() if name in _LENGTHS_FAST else pytest.mark.slow)
                 for name in LAYER_VARIANTS]


def _result_and_grads_lengths(module, x, lengths):
    out, state = module(x, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    loss = out.pow(2).sum() + sum(s.sin().sum() for s in states)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [out, *states, *grads]


def _lengths_module(name, layers=2, bidirectional=True, batch_first=False):
    cls, options = LAYER_VARIANTS[name]
    torch.manual_seed(0)
    return cls(3, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
               **options)


def _compiled_with_lengths_equals_eager(module, backend="aot_eager"):
    x = torch.randn(6, 4, 3, requires_grad=True)
    if module.batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
    want = _result_and_grads_lengths(module, x, LENGTHS)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    got = _result_and_grads_lengths(compiled, x, LENGTHS)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", EVERY_VARIANT)
def test_compile_fullgraph_lengths_equals_eager(name):
    """Outputs, final states and gradients with an unsorted lengths tensor, 2 bidirectional
    layers (AOT autograd's tracing, as inductor's, without its codegen)."""
    _compiled_with_lengths_equals_eager(_lengths_module(name))


@pytest.mark.parametrize("name", ["lstm"])
def test_compile_fullgraph_lengths_batch_first_one_layer(name):
    _compiled_with_lengths_equals_eager(
        _lengths_module(name, layers=1, bidirectional=False, batch_first=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYER_VARIANTS))
def test_compile_fullgraph_lengths_inductor_every_variant(name):
    _compiled_with_lengths_equals_eager(_lengths_module(name), backend="inductor")


class _WithLengths(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, lengths):
        return self.layer(x, lengths=lengths)


@pytest.mark.parametrize("name", EVERY_VARIANT)
def test_export_lengths_round_trip(name):
    """torch.export with lengths: one layer_forward_lengths per layer and direction, batch and
    time dynamic, the saved program equal to eager on other shapes and lengths."""
    module = _lengths_module(name).eval()
    x = torch.randn(6, 4, 3)
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
    program = torch.export.export(_WithLengths(module), (x, LENGTHS),
                                  dynamic_shapes=({0: steps, 1: batch}, {0: batch}))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rnnkit_fused.layer_forward_lengths.default) == 4
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for steps_, lengths in ((6, LENGTHS), (9, torch.tensor([2, 9, 5])), (3, torch.tensor([3, 3]))):
        x2 = torch.randn(steps_, len(lengths), 3)
        got, want = loaded(x2, lengths), module(x2, lengths=lengths)
        torch.testing.assert_close(got[0], want[0])
        for g, w in zip(got[1] if isinstance(got[1], tuple) else (got[1],),
                        want[1] if isinstance(want[1], tuple) else (want[1],)):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([4, 0, 1, 6]), r"every length must be at least 1, but lengths\[1\] = 0"),
    (torch.tensor([4, -2, 1, 6]), r"every length must be at least 1, but lengths\[1\] = -2"),
    (torch.tensor([4, 7, 1, 6]), r"lengths\[1\] = 7 is longer than the sequence dimension \(6\)"),
])
def test_bad_lengths_raise_in_compiled_and_exported_graphs(bad, message):
    """The values are checked where the graph runs (rnnkit::checked_lengths): the eager
    message, never a silently wrong answer."""
    module = rnnkit.GRU(3, 8)
    x = torch.randn(6, 4, 3)
    with pytest.raises(ValueError, match=message):
        module(x, lengths=bad)
    torch._dynamo.reset()
    compiled = torch.compile(_WithLengths(module), fullgraph=True, backend="aot_eager")
    compiled(x, LENGTHS)  # (traced with good lengths)
    with pytest.raises(Exception, match=message):
        compiled(x, bad)
    program = torch.export.export(_WithLengths(module), (x, LENGTHS)).module()
    with pytest.raises(Exception, match=message):
        program(x, bad)


@pytest.mark.parametrize("bad, error, message", [
    (torch.tensor([4.0, 6.0, 1.0, 6.0]), TypeError, "lengths must hold integers, got dtype float32"),
    (torch.tensor([[4, 6, 1, 6]]), ValueError, r"lengths must be 1-D \(batch,\), got shape \(1, 4\)"),
    (torch.tensor([4, 6, 1]), ValueError, "lengths has 3 entries but the batch has 4 sequences"),
])
def test_bad_lengths_metadata_raise_while_tracing(bad, error, message):
    """A wrong dtype or shape is seen while the graph is built: the eager error, at once."""
    module = rnnkit.LSTM(3, 8)
    x = torch.randn(6, 4, 3)
    torch._dynamo.reset()
    # (dynamo reports an exception raised in traced code as its own Unsupported, with our line)
    with pytest.raises(Exception, match=message):
        torch.compile(_WithLengths(module), fullgraph=True, backend="aot_eager")(x, bad)
    with pytest.raises(error, match=message):
        torch.export.export(_WithLengths(module), (x, bad))


@pytest.mark.parametrize("name", ["lstm", "gru_after"])
def test_opcheck_layer_forward_lengths(name):
    cfg = _config(name)
    args = list(_operator_args(cfg))
    args[16] = torch.tensor([4, 2, 1])  # (batch_sizes -> the longest-first lengths)
    torch.library.opcheck(ops().layer_forward_lengths.default, tuple(args))
    # the same results as layer_forward with the batch sizes those lengths give
    plain = list(_operator_args(cfg, grad=False))
    plain[16] = [3, 2, 1, 1]
    want = ops().layer_forward(*plain)
    args = list(_operator_args(cfg, grad=False))
    args[16] = torch.tensor([4, 2, 1])
    for got, expected in zip(ops().layer_forward_lengths(*args), want):
        torch.testing.assert_close(got, expected)


def test_layer_forward_lengths_refuses_unsorted():
    args = list(_operator_args(_config("gru_after"), grad=False))
    args[16] = torch.tensor([2, 4, 1])
    with pytest.raises(ValueError, match="sorted longest first"):
        ops().layer_forward_lengths(*args)


@pytest.mark.parametrize("cls", [rnnkit.MinGRU, rnnkit.MinLSTM])
def test_minimal_layers_lengths_compile_and_export(cls):
    torch.manual_seed(0)
    module = cls(3, 8, num_layers=2, bidirectional=True)
    x = torch.randn(6, 4, 3, requires_grad=True)
    want = _result_and_grads_lengths(module, x, LENGTHS)
    torch._dynamo.reset()
    got = _result_and_grads_lengths(torch.compile(module, fullgraph=True, backend="aot_eager"), x,
                                    LENGTHS)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    program = torch.export.export(_WithLengths(module.eval()), (x.detach(), LENGTHS)).module()
    torch.testing.assert_close(program(x.detach(), LENGTHS)[0], module(x.detach(), lengths=LENGTHS)[0])


@pytest.mark.parametrize("make", [lambda: rnnkit.GRU(3, 4), lambda: rnnkit.RNN(3, 4),
                                  lambda: rnnkit.LSTM(3, 4, peephole=True),
                                  lambda: rnnkit.GRU(3, 4, bidirectional=True)])
@pytest.mark.parametrize("lengths", [None, torch.tensor([5, 3])])
def test_double_backward_raises_not_zero(make, lengths) -> None:
    """The kernel's backward is hand-derived, so autograd cannot differentiate it: a double
    backward must raise, not give a silent zero; create_graph=True alone still works."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(5, 2, 3, requires_grad=True)
    (plain,) = torch.autograd.grad(layer(x, lengths=lengths)[0].pow(2).sum(), x)
    (grad,) = torch.autograd.grad(layer(x, lengths=lengths)[0].pow(2).sum(), x, create_graph=True)
    assert torch.equal(grad, plain)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(grad.pow(2).sum(), x)


def test_dropout_between_layers_with_traced_lengths_keeps_real_steps() -> None:
    """In a traced graph the layer holds the lengths tensor, not per-step counts: the mask of
    the dropout between layers must still be (step < length), not its transpose (T == B makes
    the wrong one shape-compatible). A tiny rate drops nothing, so compiled equals eager."""
    torch.manual_seed(0)
    layer = rnnkit.GRU(2, 4, num_layers=2, dropout=1e-7)
    x, lengths = torch.randn(3, 3, 2), torch.tensor([3, 1, 3])
    eager = layer(x, lengths=lengths)[0]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, lengths=lengths)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ---- issue 15: the last layers that could not be traced -----------------------------------------
#
# The layer-normalised layers (rnnkit_ln operators), proj_size with lengths= (the reference loop
# over a lengths tensor), the regularisers' masks in training (rnnkit_masks::keyed_mask) and a
# 0-d lengths tensor.

TRACED = {
    "ln_lstm": (rnnkit.LSTM, {"layer_norm": True}),
    "ln_lstm_peephole_coupled": (rnnkit.LSTM, {"layer_norm": True, "peephole": True,
                                               "coupled": True}),
    "ln_lstm_peephole": (rnnkit.LSTM, {"layer_norm": True, "peephole": True}),
    "ln_gru_after": (rnnkit.GRU, {"layer_norm": True}),
    "ln_gru_before": (rnnkit.GRU, {"layer_norm": True, "reset": "before"}),
    "lstm_proj": (rnnkit.LSTM, {"proj_size": 5}),  # (torch's op padded, bptt chunks ragged)
    "lstm_proj_peephole": (rnnkit.LSTM, {"proj_size": 5, "peephole": True}),  # (bptt)
}
# (the projected LSTM's unrolled loop takes ~1 min to trace at 2 bidirectional layers: slow;
# one layer below)
_TRACED_FAST = ("ln_lstm_peephole_coupled", "ln_gru_before")
EVERY_TRACED = [pytest.param(name, marks=() if name in _TRACED_FAST else pytest.mark.slow)
                for name in TRACED]


def _traced_module(name, layers=2, bidirectional=True):
    cls, variant = TRACED[name]
    torch.manual_seed(0)
    return cls(3, 8, num_layers=layers, bidirectional=bidirectional, **variant)


def _compiled_equals_eager_lengths(module, lengths, backend="aot_eager", rtol=1e-5, atol=1e-6):
    x = torch.randn(6, 4, 3, requires_grad=True)
    run = _result_and_grads if lengths is None else (
        lambda m, x: _result_and_grads_lengths(m, x, lengths))
    want = run(module, x)
    torch._dynamo.reset()
    got = run(torch.compile(module, fullgraph=True, backend=backend), x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["padded", "lengths"])
@pytest.mark.parametrize("name", EVERY_TRACED)
def test_compile_fullgraph_traced_layers_equal_eager(name, lengths):
    """Outputs, final states and every gradient, 2 bidirectional layers, with and without an
    unsorted lengths tensor (AOT autograd's tracing, as inductor's)."""
    _compiled_equals_eager_lengths(_traced_module(name), lengths)


def test_compile_projected_lstm_lengths_one_layer():
    _compiled_equals_eager_lengths(_traced_module("lstm_proj", 1, False), LENGTHS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRACED))
def test_compile_fullgraph_traced_layers_inductor(name):
    # (inductor's generated layer norm of the input projection sums in another order: float32
    # gradients up to ~16 differed by up to 2.7e-5, ln_lstm, 2 bidirectional layers)
    _compiled_equals_eager_lengths(_traced_module(name), LENGTHS, backend="inductor", rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("name", EVERY_TRACED)
def test_export_traced_layers_round_trip(name):
    """torch.export + save/load of the eval layer with lengths; the layer-normalised kernels
    appear as one rnnkit_ln operator per layer and direction, batch and time dynamic; the
    projected LSTM's time loop is unrolled (its time dimension stays static)."""
    module = _traced_module(name).eval()
    x = torch.randn(6, 4, 3)
    layer_norm = module.math.layer_norm
    batch = torch.export.Dim("batch", min=2)
    dims = ({0: torch.export.Dim("steps", min=2), 1: batch} if layer_norm else {1: batch},
            {0: batch})
    program = torch.export.export(_WithLengths(module), (x, LENGTHS), dynamic_shapes=dims)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    if layer_norm:
        assert targets.count(torch.ops.rnnkit_ln.layer_forward_lengths.default) == 4
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    cases = [(6, LENGTHS), (6, torch.tensor([2, 6, 5]))]
    if layer_norm:
        cases.append((9, torch.tensor([2, 9, 5])))
    for steps, lengths in cases:
        x2 = torch.randn(steps, len(lengths), 3)
        got, want = loaded(x2, lengths), module(x2, lengths=lengths)
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(g, w)


def test_export_layer_norm_without_lengths():
    module = _traced_module("ln_gru_after").eval()
    x = torch.randn(6, 4, 3)
    program = torch.export.export(module, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rnnkit_ln.layer_forward.default) == 4
    torch.testing.assert_close(program.module()(x)[0], module(x)[0])


def _layer_norm_args(kind, peephole=False, coupled=False, before=False, batch_sizes=(),
                     grad=True):
    """rnnkit_ln::layer_forward's arguments: T=4, B=3, H=5, float64 (the LSTM and GRU-after:
    the raw projection and the input LN's gain and bias, which their kernel applies)."""
    gen = torch.Generator().manual_seed(0)
    gates = (3 if coupled else 4) * 5 if kind == 1 else 15

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).sub(0.5).requires_grad_(grad)

    lstm, input_ln = kind == 1, not before
    peep = rand(2 if coupled else 3, 5) if peephole else None
    return (kind, peephole, coupled, before, rand(4, 3, gates), rand(3, 5),
            rand(3, 5) if lstm else None, rand(gates, 5), rand(gates).add(1), rand(gates),
            rand(5).add(1) if lstm else None, rand(5) if lstm else None, peep,
            rand(gates).add(1) if input_ln else None, rand(gates) if input_ln else None,
            batch_sizes, True, 0)


LAYER_NORM_OPERATOR_CASES = {
    "lstm_peephole": dict(kind=1, peephole=True),
    "lstm_coupled": dict(kind=1, coupled=True),
    "gru_after": dict(kind=2),
    "gru_before": dict(kind=2, before=True),
}


def ln_ops():
    return _layer_norm.load()


# (each case runs 7 opchecks, 30-50 s on a loaded core: two fast, two slow)
@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name in ("lstm_peephole",
                                                                          "gru_before")
                                               else pytest.mark.slow)
                                  for name in LAYER_NORM_OPERATOR_CASES])
def test_opcheck_layer_norm_operators(name):
    options = LAYER_NORM_OPERATOR_CASES[name]
    lstm = options["kind"] == 1
    for batch_sizes in ([], [3, 3, 2, 1]):
        args = list(_layer_norm_args(**options, batch_sizes=batch_sizes))
        torch.library.opcheck(ln_ops().layer_forward.default, tuple(args))
        lengths = list(args)
        lengths[15] = torch.tensor([4, 3, 2]) if batch_sizes else torch.tensor([4, 4, 4])
        torch.library.opcheck(ln_ops().layer_forward_lengths.default, tuple(lengths))
        # the lengths operator is the batch-sizes one
        for got, want in zip(ln_ops().layer_forward_lengths(*lengths), ln_ops().layer_forward(*args)):
            torch.testing.assert_close(got, want)
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        y, h, c, acts, ahat, stats, cells = ln_ops().layer_forward(*plain)
        backward = (*plain[:4], plain[5], plain[6], plain[7], plain[8], plain[9], plain[10],
                    plain[12], plain[13], batch_sizes, y, acts, ahat, stats, cells,
                    plain[4] if plain[13] is not None else None, torch.randn_like(y),
                    torch.randn_like(h),
                    torch.randn_like(c) if lstm else None, 0)
        torch.library.opcheck(ln_ops().layer_backward.default, backward)
    a, b = torch.randn(7, 5, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    torch.library.opcheck(ln_ops().matmul.default, (a.float(), b.float()))


@pytest.mark.parametrize("name", list(LAYER_NORM_OPERATOR_CASES))
def test_opcheck_layer_norm_step(name):
    """rnnkit_ln::step (the no-grad cell step): schema and fake kernel (it has no autograd: the
    cell takes the layer path when a gradient is needed), and its h, c are the layer kernel's
    at T = 1 from the same raw projection."""
    options = LAYER_NORM_OPERATOR_CASES[name]
    lstm = options["kind"] == 1
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in _layer_norm_args(**options, grad=False)]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    w_ih = torch.rand(args[7].shape[0], 4, generator=gen, dtype=torch.float64)
    gates = w_ih.shape[0]
    in_w = args[13] if args[13] is not None else torch.rand(gates, dtype=torch.float64).add(1)
    in_b = args[14] if args[14] is not None else torch.rand(gates, dtype=torch.float64)
    step = (*args[:4], x, args[5], args[6], w_ih, args[7], in_w, in_b, *args[8:13], 0)
    torch.library.opcheck(ln_ops().step.default, step,
                          test_utils=("test_schema", "test_faketensor"))
    h, c = ln_ops().step(*step)
    gx = torch.nn.functional.layer_norm(x @ w_ih.t(), (gates,), in_w, in_b)
    layer = list(args)
    layer[4], layer[13], layer[14], layer[16] = gx.unsqueeze(0), None, None, False
    _, h_want, c_want, *_ = ln_ops().layer_forward(*layer)
    torch.testing.assert_close(h, h_want)
    if lstm:
        torch.testing.assert_close(c, c_want)


@pytest.mark.parametrize("index, short, message", [
    (9, 2, "ln_ih_weight and ln_ih_bias must be"), (11, 2, "ln_weight and ln_bias must be"),
    (13, 2, "cell LN's weight and bias must be"), (15, (1, 5), "peephole weights must be")])
def test_layer_norm_step_refuses_short_parameters(index, short, message):
    """rnnkit_ln::step read every LN gain and bias at the sizes H and G*H imply: two-element LN
    weights gave h = 0 from memory past them, without an error (review, session 12)."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in _layer_norm_args(**LAYER_NORM_OPERATOR_CASES["lstm_peephole"], grad=False)]
    x = torch.rand(3, 4, dtype=torch.float64)
    w_ih = torch.rand(args[7].shape[0], 4, dtype=torch.float64)
    gates = w_ih.shape[0]
    step = [*args[:4], x, args[5], args[6], w_ih, args[7], torch.ones(gates, dtype=torch.float64),
            torch.zeros(gates, dtype=torch.float64), *args[8:13], 0]
    ln_ops().step(*step)  # (the well-formed call runs)
    step[index] = torch.rand(short, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        ln_ops().step(*step)


@pytest.mark.parametrize("operators, name", [
    ("rnnkit_fused", "layer_forward"), ("rnnkit_fused", "layer_backward"),
    ("rnnkit_ln", "layer_forward"), ("rnnkit_ln", "layer_backward")])
def test_lengths_operator_schema_is_the_kernels(operators, name):
    """Each ``*_lengths`` operator is its C++ operator's schema with ``int[] batch_sizes``
    replaced by ``Tensor lengths`` and nothing else changed."""
    ops() and ln_ops()
    namespace = getattr(torch.ops, operators)
    plain = getattr(namespace, name).default._schema
    ragged = getattr(namespace, name + "_lengths").default._schema
    changed = [(a.name, str(a.type), b.name, str(b.type))
               for a, b in zip(plain.arguments, ragged.arguments)
               if (a.name, str(a.type)) != (b.name, str(b.type))]
    assert changed == [("batch_sizes", "List[int]", "lengths", "Tensor")]
    assert len(plain.arguments) == len(ragged.arguments)
    assert [str(r.type) for r in plain.returns] == [str(r.type) for r in ragged.returns]


def test_layer_norm_double_backward_raises():
    layer = rnnkit.LSTM(3, 4, layer_norm=True)
    x = torch.randn(5, 2, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(grad.pow(2).sum(), x)


# ---- the regularisers' masks in a traced graph ----

REGULARISED = {
    "lstm_all": (rnnkit.LSTM, dict(zoneout=0.2, zoneout_cell=0.3, recurrent_dropout=0.3,
                                   input_dropout=0.2, weight_drop=0.3)),
    "gru_zoneout": (rnnkit.GRU, dict(zoneout=0.3, recurrent_dropout=0.2)),
    # (not torch.nn's dropout between layers: with lengths eager draws it over the real steps
    # only, a data-dependent shape, and a traced graph over the padded tensor)
    "rnn_recurrent_dropout": (rnnkit.RNN, dict(recurrent_dropout=0.4)),
    "ln_gru_weight_drop": (rnnkit.GRU, dict(layer_norm=True, weight_drop=0.3, input_dropout=0.2)),
}


def _regularised(name):
    cls, options = REGULARISED[name]
    torch.manual_seed(0)
    return cls(3, 8, num_layers=2, bidirectional=True, **options).train()


def _seeded(module, x, lengths, seed=1):
    torch.manual_seed(seed)
    return (_result_and_grads(module, x) if lengths is None
            else _result_and_grads_lengths(module, x, lengths))


# (one compile takes 5-10 s: every option at once by default, each layer family slow)
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["padded", "lengths"])
@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name == "lstm_all" else
                                               pytest.mark.slow) for name in REGULARISED])
def test_compile_training_masks_equal_eager_for_the_same_seed(name, lengths):
    """In training the masks' key is drawn in the graph (randint) and read by
    rnnkit_masks::keyed_mask when it runs: AOT autograd replays torch's generator, so the same
    seed gives eager's masks, outputs and gradients; another seed gives other masks."""
    module = _regularised(name)
    x = torch.randn(6, 4, 3, requires_grad=True)
    want = _seeded(module, x, lengths)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = _seeded(compiled, x, lengths)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    other = _seeded(compiled, x, lengths, seed=2)
    assert not torch.equal(other[0], got[0])


@pytest.mark.slow
def test_compile_inductor_masks():
    """inductor: with fallback_random the masks are eager's; with its own random stream (the
    default) they differ from eager's, but the same seed gives the same result twice and each
    mask keeps its rate."""
    module = _regularised("lstm_all")
    x = torch.randn(6, 4, 3, requires_grad=True)
    want = _seeded(module, x, None)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        got = _seeded(torch.compile(module, fullgraph=True, backend="inductor"), x, None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    first, second = _seeded(compiled, x, None), _seeded(compiled, x, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(_seeded(compiled, x, None, seed=2)[0], first[0])

    from rnnkit.engine.regularise import keep_mask

    masks = torch.compile(lambda like: (keep_mask(like, (200, 500), 0.3, 1.0),
                                        keep_mask(like, (200, 500), 0.3, 1.0)),
                          fullgraph=True, backend="inductor")
    torch.manual_seed(3)
    a, b = masks(x)
    torch.manual_seed(3)
    assert torch.equal(masks(x)[0], a)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)
    for mask in (a, b):  # 100000 Bernoulli(0.3) draws: sd 0.0014
        assert abs(mask.mean().item() - 0.3) < 0.01


def test_opcheck_keyed_mask():
    key = torch.tensor([12345, 67890])
    args = ([4, 5], key, 2**31, 2.0, torch.float32, torch.device("cpu"))
    torch.library.opcheck(torch.ops.rnnkit_masks.keyed_mask.default, args)
    from rnnkit.engine.regularise import keep_mask_reference

    torch.testing.assert_close(torch.ops.rnnkit_masks.keyed_mask(*args),
                               keep_mask_reference([4, 5], (12345, 67890), 2**31, 2.0,
                                                   torch.float32))


@pytest.mark.parametrize("name", ["lstm_all", "gru_zoneout"])
def test_export_regularised_layers_in_eval(name):
    """At evaluation only zoneout acts (its expectation): the exported program equals eager."""
    module = _regularised(name).eval()
    x = torch.randn(6, 4, 3)
    program = torch.export.export(_WithLengths(module), (x, LENGTHS)).module()
    for g, w in zip(torch.utils._pytree.tree_leaves(program(x, LENGTHS)),
                    torch.utils._pytree.tree_leaves(module(x, lengths=LENGTHS))):
        torch.testing.assert_close(g, w)


# ---- a 0-d lengths tensor: one sequence, as in eager ----

def test_zero_dim_lengths_compile_and_export():
    module = rnnkit.GRU(3, 8, num_layers=2, bidirectional=True)
    x = torch.randn(6, 1, 3, requires_grad=True)
    length = torch.tensor(4)
    want = _result_and_grads_lengths(module, x, length)
    torch.testing.assert_close(want[0], _result_and_grads_lengths(module, x, torch.tensor([4]))[0])
    torch._dynamo.reset()
    got = _result_and_grads_lengths(torch.compile(module, fullgraph=True, backend="aot_eager"),
                                    x, length)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    program = torch.export.export(_WithLengths(module.eval()), (x.detach(), length)).module()
    for steps in (4, 6, 3):
        torch.testing.assert_close(program(x.detach(), torch.tensor(steps))[0],
                                   module(x.detach(), lengths=torch.tensor(steps))[0])
    with pytest.raises(Exception, match=r"lengths\[0\] = 7 is longer"):
        program(x.detach(), torch.tensor(7))
