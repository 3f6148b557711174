"""The cells: hand-derived step backward against autograd, and the one-step API."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from conftest import VARIANTS
from rnnkit.state_tree import map_state


def _random_step_inputs(cell: rnnkit.cells.RecurrentCell, batch: int):
    hidden = cell.hidden_size
    gx = torch.randn(batch, cell.math.num_gates * hidden, dtype=torch.float64, requires_grad=True)
    state = tuple(
        torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True)
        for _ in cell.math.state_names
    )
    return gx, state


@pytest.mark.parametrize("bias", [True, False])
def test_step_backward_equals_autograd(variant: str, bias: bool) -> None:
    _, cell_class, options = VARIANTS[variant]
    cell = cell_class(3, 5, bias=bias, **options).double()
    gx, state = _random_step_inputs(cell, batch=4)
    new_state, cache = cell.math.step(gx, state, cell.weight_hh, cell.bias_hh,
                                      cell.diagonal_weights)
    upstream = tuple(torch.randn_like(s) for s in new_state)
    wanted = [gx, *state, cell.weight_hh, *cell.diagonal_weights]
    if bias:
        wanted.append(cell.bias_hh)
    expected = torch.autograd.grad(new_state, wanted, upstream)

    with torch.no_grad():
        d_gx, d_gh, d_prev, d_diag = cell.math.step_backward(
            upstream, cache, cell.weight_hh, cell.diagonal_weights
        )
        groups = cell.math.recurrent_row_groups(cell.hidden_size)
        d_w_hh = torch.cat([
            d_gh[:, rows].t() @ inputs
            for rows, inputs in zip(groups, cell.math.recurrent_inputs(cache))
        ])
    got = [d_gx, *d_prev, d_w_hh, *d_diag]
    if bias:
        got.append(d_gh.sum(0))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("cell_class", "torch_class"),
    [(rnnkit.RNNCell, torch.nn.RNNCell), (rnnkit.LSTMCell, torch.nn.LSTMCell),
     (rnnkit.GRUCell, torch.nn.GRUCell)],
)
def test_cell_from_torch_matches_torch_cell(cell_class, torch_class) -> None:
    reference = torch_class(6, 4)
    cell = cell_class.from_torch(reference)
    x = torch.randn(3, 6, requires_grad=True)
    state = cell.zero_state(3)
    state = map_state(lambda s: torch.randn_like(s), state)
    output, new_state = cell(x, state)
    torch_state = state[0] if len(state) == 1 else tuple(state)
    expected = reference(x, torch_state)
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    for got, want in zip(new_state, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output, expected[0])
    grads = torch.autograd.grad(output.sum(), [x, cell.weight_ih, cell.weight_hh])
    want_grads = torch.autograd.grad(expected[0].sum(), [x, reference.weight_ih,
                                                         reference.weight_hh])
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cell_api_sizes_and_zero_state(variant: str) -> None:
    _, cell_class, options = VARIANTS[variant]
    cell = cell_class(3, 5, **options)
    assert cell.output_size == 5
    state = cell.zero_state(2, dtype=torch.float64)
    assert all(s.shape == (2, 5) and s.dtype == torch.float64 and not s.any() for s in state)
    if cell_class is rnnkit.LSTMCell:
        assert cell.state_size == rnnkit.LSTMState(5, 5)
        assert isinstance(state, rnnkit.LSTMState)
        _, new = cell(torch.randn(2, 3))
        assert isinstance(new, rnnkit.LSTMState)
        assert new.h.shape == new.c.shape == (2, 5)
    else:
        assert cell.state_size == 5


def test_cell_unbatched_step_equals_batched(variant: str) -> None:
    _, cell_class, options = VARIANTS[variant]
    cell = cell_class(3, 5, **options)
    x = torch.randn(3)
    output, state = cell(x)
    batched_output, batched_state = cell(x.unsqueeze(0))
    assert output.shape == (5,)
    torch.testing.assert_close(output, batched_output[0])
    for s, b in zip(state, batched_state):
        torch.testing.assert_close(s, b[0])


def test_peephole_and_coupled_parameters() -> None:
    names = dict(rnnkit.LSTMCell(3, 5, peephole=True).named_parameters())
    assert {"weight_ci", "weight_cf", "weight_co"} <= names.keys()
    assert names["weight_ci"].shape == (5,)
    coupled = dict(rnnkit.LSTMCell(3, 5, peephole=True, coupled=True).named_parameters())
    assert "weight_cf" not in coupled and coupled["weight_ih"].shape == (15, 3)


def test_forget_bias_sets_the_total_forget_bias() -> None:
    cell = rnnkit.LSTMCell(3, 4, forget_bias=1.0)
    total = cell.bias_ih + cell.bias_hh
    torch.testing.assert_close(total[4:8], torch.ones(4))
    coupled = rnnkit.LSTMCell(3, 4, coupled=True, forget_bias=1.0)
    x = torch.zeros(1, 3)
    with torch.no_grad():
        coupled.weight_hh.zero_()
        coupled.weight_ih.zero_()
        _, state = coupled(x, coupled.zero_state(1))
    # f = 1 − i = σ(1) when the input gate's total bias is −1: c = i·g with g = tanh(b_g)
    i = 1 - torch.sigmoid(torch.tensor(1.0))
    g = torch.tanh((coupled.bias_ih + coupled.bias_hh)[4:8])
    torch.testing.assert_close(state.c[0], i * g)


def test_stacked_cell_runs_cells_in_depth() -> None:
    first, second = rnnkit.LSTMCell(3, 6), rnnkit.GRUCell(6, 4, reset="before")
    stacked = rnnkit.StackedCell([first, second])
    assert stacked.output_size == 4
    assert stacked.state_size == (rnnkit.LSTMState(6, 6), 4)
    x = torch.randn(2, 3)
    output, (s1, s2) = stacked(x)
    h1, expected_s1 = first(x)
    expected_output, expected_s2 = second(h1)
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(s1.c, expected_s1.c)
    torch.testing.assert_close(s2[0], expected_s2[0])


def test_stacked_cell_rejects_mismatched_sizes() -> None:
    with pytest.raises(ValueError, match="output_size 6 feeds a cell with input_size 5"):
        rnnkit.StackedCell([rnnkit.LSTMCell(3, 6), rnnkit.GRUCell(5, 4)])


@pytest.mark.parametrize(
    ("make_call", "error", "message"),
    [
        (lambda c: c(torch.randn(2, 4)), ValueError, "4 features in its last dimension but "
                                                     "input_size is 3"),
        (lambda c: c(torch.randn(2, 3, 1)), ValueError, "x_t must be"),
        (lambda c: c(torch.randn(2, 3, dtype=torch.float64)), TypeError,
         "dtype torch.float64 but the parameters are torch.float32"),
        (lambda c: c(torch.randn(2, 3), (torch.zeros(2, 5),)), ValueError,
         r"expects a state of 2 tensor\(s\)"),
        (lambda c: c(torch.randn(2, 3), rnnkit.LSTMState(torch.zeros(3, 5), torch.zeros(3, 5))),
         ValueError, r"state.h must have shape \(2, 5\), got \(3, 5\)"),
    ],
)
def test_cell_errors_name_the_problem(make_call, error, message) -> None:
    with pytest.raises(error, match=message):
        make_call(rnnkit.LSTMCell(3, 5))


def test_unknown_variants_are_refused() -> None:
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        rnnkit.RNNCell(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="reset must be one of"):
        rnnkit.GRU(3, 4, reset="middle")
