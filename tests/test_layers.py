"""The sequence layers: drop-in parity with torch.nn, unroll/StackedCell equivalence, errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from conftest import VARIANTS

TORCH_TWINS = {
    "rnn_tanh": (torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (torch.nn.LSTM, {}),
    "gru_after": (torch.nn.GRU, {}),
}

# (num_layers, bidirectional, batch_first, lengths: None | "lengths" | "packed", given state)
GRID = [
    (1, False, False, None, False),
    (2, True, False, None, True),
    (3, False, True, "lengths", True),
    (2, True, True, "packed", False),
    (1, True, False, "packed", True),
    (3, True, False, "lengths", False),
]


def _states(module_output):
    return module_output if isinstance(module_output, tuple) else (module_output,)


def _padded(output):
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        return pad_packed_sequence(output)[0]
    return output


@pytest.mark.parametrize("name", sorted(TORCH_TWINS))
@pytest.mark.parametrize(("layers", "bidirectional", "batch_first", "lengths_mode", "given_state"),
                         GRID)
def test_matches_torch_nn(name, layers, bidirectional, batch_first, lengths_mode, given_state):
    torch_class, options = TORCH_TWINS[name]
    steps, batch, inputs, hidden = 7, 4, 5, 6
    reference = torch_class(inputs, hidden, num_layers=layers, bidirectional=bidirectional,
                            batch_first=batch_first, **options)
    layer = VARIANTS[name][0].from_torch(reference)
    shape = (batch, steps, inputs) if batch_first else (steps, batch, inputs)
    x = torch.randn(shape, requires_grad=True)
    depth = layers * (2 if bidirectional else 1)
    hx = None
    if given_state:
        hx = tuple(torch.randn(depth, batch, hidden, requires_grad=True)
                   for _ in layer.math.state_names)
    lengths = torch.tensor([7, 3, 5, 3])

    def run(module, use_lengths_kwarg):
        state = None if hx is None else (hx if len(hx) == 2 else hx[0])
        if lengths_mode == "packed":
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                          enforce_sorted=False)
            out, final = module(packed, state)
            return pad_packed_sequence(out, batch_first=batch_first)[0], _states(final)
        if lengths_mode == "lengths":
            if use_lengths_kwarg:
                out, final = module(x, state, lengths=lengths)
                return out, _states(final)
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                          enforce_sorted=False)
            out, final = module(packed, state)
            padded = pad_packed_sequence(out, batch_first=batch_first, total_length=steps)[0]
            return padded, _states(final)
        out, final = module(x, state)
        return out, _states(final)

    out, final = run(layer, use_lengths_kwarg=True)
    expected_out, expected_final = run(reference, use_lengths_kwarg=False)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(final, expected_final):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out * weights).sum() + sum((f * f).sum() for f in final)
    expected_loss = (expected_out * weights).sum() + sum((f * f).sum() for f in expected_final)
    leaves = [x, *(hx or ())]
    grads = torch.autograd.grad(loss, leaves + list(layer.parameters()))
    expected_grads = torch.autograd.grad(expected_loss, leaves + list(reference.parameters()))
    names = ["input", *(f"hx{i}" for i in range(len(hx or ())))]
    names += [n for n, _ in layer.named_parameters()]
    for label, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=label: f"{n}: {m}")


def test_parameter_names_and_shapes_follow_torch() -> None:
    ours = rnnkit.LSTM(3, 5, num_layers=2, bidirectional=True)
    theirs = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in theirs.named_parameters()
    ]
    peephole = dict(rnnkit.LSTM(3, 5, num_layers=2, bidirectional=True,
                                peephole=True).named_parameters())
    assert peephole["weight_co_l1_reverse"].shape == (5,)


@pytest.mark.parametrize("name", sorted(TORCH_TWINS))
def test_to_torch_round_trip(name: str) -> None:
    layer_class, _, options = VARIANTS[name]
    layer = layer_class(4, 3, num_layers=2, bidirectional=True, **options)
    module = layer.to_torch()
    assert isinstance(module, TORCH_TWINS[name][0])
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(layer(x)[0], module(x)[0], rtol=1e-5, atol=1e-6)


def test_to_torch_refuses_variants_torch_lacks() -> None:
    with pytest.raises(ValueError, match="neither peephole connections nor coupled gates"):
        rnnkit.LSTM(3, 4, peephole=True).to_torch()
    with pytest.raises(ValueError, match=r'reset="after" form'):
        rnnkit.GRU(3, 4, reset="before").to_torch()
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.GRU"):
        rnnkit.GRU.from_torch(torch.nn.LSTM(3, 4))


def test_float64_and_unbatched_input() -> None:
    reference = torch.nn.GRU(3, 4, num_layers=2).double()
    layer = rnnkit.GRU.from_torch(reference)
    assert layer.weight_hh_l0.dtype == torch.float64
    x = torch.randn(6, 3, dtype=torch.float64)
    out, h = layer(x)
    expected_out, expected_h = reference(x)
    assert out.shape == (6, 4) and h.shape == (2, 4)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(h, expected_h)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("reverse", [False, True])
def test_unroll_of_a_cell_equals_the_layer(name: str, reverse: bool) -> None:
    layer_class, cell_class, options = VARIANTS[name]
    layer = layer_class(3, 4, bidirectional=reverse, **options)
    cell = cell_class(3, 4, **options)
    suffix = "_l0_reverse" if reverse else "_l0"
    with torch.no_grad():
        for cell_name, value in cell.named_parameters():
            value.copy_(getattr(layer, cell_name + suffix))
    x = torch.randn(6, 3, 3)
    lengths = torch.tensor([6, 2, 4])
    outputs, final = rnnkit.unroll(cell, x, lengths=lengths, reverse=reverse)
    layer_out, layer_final = layer(x, lengths=lengths)
    direction = 1 if reverse else 0
    torch.testing.assert_close(outputs, layer_out[..., direction * 4:(direction + 1) * 4])
    for got, want in zip(final, _states(layer_final)):
        torch.testing.assert_close(got, want[direction])


def test_stacked_cell_equals_num_layers() -> None:
    layer = rnnkit.LSTM(3, 4, num_layers=3, peephole=True)
    cells = [rnnkit.LSTMCell(3 if k == 0 else 4, 4, peephole=True) for k in range(3)]
    with torch.no_grad():
        for k, cell in enumerate(cells):
            for cell_name, value in cell.named_parameters():
                value.copy_(getattr(layer, f"{cell_name}_l{k}"))
    stacked = rnnkit.StackedCell(cells)
    x = torch.randn(5, 2, 3)
    outputs, final = rnnkit.unroll(stacked, x)
    layer_out, (h_n, c_n) = layer(x)
    torch.testing.assert_close(outputs, layer_out)
    for k, state in enumerate(final):
        torch.testing.assert_close(state.h, h_n[k])
        torch.testing.assert_close(state.c, c_n[k])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_stacks_bidirectionally_with_lengths(name: str) -> None:
    layer_class, _, options = VARIANTS[name]
    layer = layer_class(3, 4, num_layers=2, bidirectional=True, batch_first=True, **options)
    x = torch.randn(3, 5, 3)
    lengths = [5, 1, 3]
    out, final = layer(x, lengths=lengths)
    assert out.shape == (3, 5, 8)
    assert not out[1, 1:].any()
    # each sequence alone gives the same result as in the padded batch
    for row, length in enumerate(lengths):
        alone, alone_final = layer(x[row:row + 1, :length])
        torch.testing.assert_close(out[row:row + 1, :length], alone, rtol=1e-5, atol=1e-6)
        for got, want in zip(_states(final), _states(alone_final)):
            torch.testing.assert_close(got[:, row], want[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_ragged_gradients_are_the_sum_of_each_row_alone(name: str) -> None:
    """2 layers, bidirectional, float64: the gradients of a ragged batch (x's and every
    parameter's) are those of each sequence run alone at its own length, summed; the padding's
    gradient is exactly 0."""
    layer_class, _, options = VARIANTS[name]
    torch.manual_seed(5)
    layer = layer_class(3, 4, num_layers=2, bidirectional=True, **options).double()
    lengths = [6, 2, 4, 6, 1]
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    weight = torch.randn(6, 5, 8, dtype=torch.float64)

    def grads(source: torch.Tensor, rows: slice, given: list[int] | None) -> list[torch.Tensor]:
        source = source.clone().requires_grad_()
        out, final = layer(source, lengths=given)
        loss = (out * weight[: out.shape[0], rows]).sum()
        loss = loss + sum(s.square().sum() for s in _states(final))
        return list(torch.autograd.grad(loss, [source, *layer.parameters()]))

    got = grads(x, slice(None), lengths)
    want = [torch.zeros_like(g) for g in got]
    for row, length in enumerate(lengths):
        alone = grads(x[:length, row:row + 1], slice(row, row + 1), None)
        want[0][:length, row:row + 1] += alone[0]
        for w, a in zip(want[1:], alone[1:]):
            w += a
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    padding = torch.arange(6).unsqueeze(1) >= torch.tensor(lengths)  # (T, B)
    assert bool((got[0][padding] == 0).all())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lengths_that_all_equal_t_give_the_padded_call_bit_for_bit(name: str) -> None:
    """Nothing to skip: outputs, final states and every gradient are the padded call's exactly
    (the layer runs that call; before, a sort and ragged bookkeeping ran around it)."""
    layer_class, _, options = VARIANTS[name]
    layer = layer_class(3, 4, num_layers=2, bidirectional=True, **options)
    x = torch.randn(6, 5, 3)

    def run(lengths: torch.Tensor | None) -> list[torch.Tensor]:
        source = x.clone().requires_grad_()
        out, final = layer(source, lengths=lengths)
        states = _states(final)
        loss = out.square().sum() + sum(s.sum() for s in states)
        grads = torch.autograd.grad(loss, [source, *layer.parameters()])
        return [out, *states, *grads]

    for got, want in zip(run(torch.full((5,), 6)), run(None), strict=True):
        assert torch.equal(got, want)


def test_bptt_and_reference_backends_agree_on_a_layer() -> None:
    fast = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, coupled=True, peephole=True)
    slow = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, coupled=True, peephole=True,
                       backend="reference")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(6, 3, 3)
    out_fast, _ = fast(x, lengths=[6, 4, 2])
    out_slow, _ = slow(x, lengths=[6, 4, 2])
    torch.testing.assert_close(out_fast, out_slow)
    g_fast = torch.autograd.grad(out_fast.sum(), list(fast.parameters()))
    g_slow = torch.autograd.grad(out_slow.sum(), list(slow.parameters()))
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_plain_lstm_stack_in_one_torch_call_equals_layer_by_layer(monkeypatch, bias: bool) -> None:
    from rnnkit import layers

    calls = []
    original = layers.RecurrentLayer._torch_stack

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(layers.RecurrentLayer, "_torch_stack", counted)
    # the plain LSTM on torch's op (which shapes take it depends on the CPU's route table)
    from rnnkit.engine import fused
    from rnnkit.engine.fused import route_table

    with fused.plain_lstm_path("torch"):
        hidden = 72
        whole = rnnkit.LSTM(3, hidden, num_layers=3, bidirectional=True, bias=bias)
        by_layer = rnnkit.LSTM(3, hidden, num_layers=3, bidirectional=True, bias=bias, backend="bptt")
        by_layer.load_state_dict(whole.state_dict())
        x = torch.randn(9, 5, 3)
        h0, c0 = torch.randn(6, 5, hidden), torch.randn(6, 5, hidden)
        got, want = whole(x, (h0, c0)), by_layer(x, (h0, c0))
        assert calls == [1]  # the fused backend handed the whole stack to torch
        for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
            torch.testing.assert_close(a, b)
        grads = [torch.autograd.grad(out[0].sum() + out[1][1].sum(), list(m.parameters()))
                 for out, m in ((got, whole), (want, by_layer))]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
        # lengths, dropout in training and rnnkit's own variants take the layer-by-layer path
        whole(x, lengths=[9, 8, 5, 3, 1])
        rnnkit.LSTM(3, hidden, num_layers=2, dropout=0.5)(x)
        rnnkit.LSTM(3, hidden, peephole=True)(x)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # (with 1 thread torch's op wins)
    with route_table.using(None):  # (the built-in rules: a small batch × hidden is rnnkit's)
        rnnkit.LSTM(3, 16, num_layers=2)(x)
    assert calls == [1]


def test_dropout_between_layers_only_in_training() -> None:
    layer = rnnkit.GRU(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3)
    torch.manual_seed(1)
    train_a = layer(x)[0]
    torch.manual_seed(2)
    train_b = layer(x)[0]
    assert not torch.allclose(train_a, train_b)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    with pytest.warns(UserWarning, match="no effect"):
        rnnkit.LSTM(3, 4, num_layers=1, dropout=0.2)


BAD_CALLS = {
    "rank": (lambda m: m(torch.randn(2, 3, 4, 3)), ValueError, "must be 3-D"),
    "features": (lambda m: m(torch.randn(5, 2, 7)), ValueError,
                 "7 features in its last dimension but input_size is 3"),
    "dtype": (lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64)), TypeError,
              "dtype torch.float64 but the parameters are torch.float32"),
    "empty lengths": (lambda m: m(torch.randn(5, 2, 3), lengths=[]), ValueError,
                      "lengths is empty"),
    "zero length": (lambda m: m(torch.randn(5, 2, 3), lengths=[5, 0]), ValueError,
                    r"at least 1, but lengths\[1\] = 0"),
    "long length": (lambda m: m(torch.randn(5, 2, 3), lengths=[6, 2]), ValueError,
                    r"lengths\[0\] = 6 is longer than the sequence dimension \(5\)"),
    "lengths count": (lambda m: m(torch.randn(5, 2, 3), lengths=[5, 2, 1]), ValueError,
                      "lengths has 3 entries but the batch has 2"),
    "float lengths": (lambda m: m(torch.randn(5, 2, 3), lengths=torch.tensor([5.0, 2.0])),
                      TypeError, "lengths must hold integers"),
    "lengths device": (lambda m: m(torch.randn(5, 2, 3),
                                   lengths=torch.empty(2, dtype=torch.long, device="meta")),
                       ValueError, "lengths is on device meta but the input is on cpu"),
    "state shape": (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4))),
                    ValueError, r"hx h_0 must have shape \(2, 2, 4\)"),
    "state arity": (lambda m: m(torch.randn(5, 2, 3), torch.zeros(2, 2, 4)), ValueError,
                    r"expects hx to be a tuple \(h_0, c_0\)"),
    "both packed and lengths": (
        lambda m: m(pack_padded_sequence(torch.randn(5, 2, 3), [5, 2]), lengths=[5, 2]),
        ValueError, "not both"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_errors_name_the_problem(case: str) -> None:
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call(rnnkit.LSTM(3, 4, num_layers=2))

