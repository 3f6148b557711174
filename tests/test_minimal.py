"""minGRU / minLSTM: the parallel scan equals the step-by-step recurrence, values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.cells.minimal import MinGRUMath, MinLSTMMath, positive_activation
from rnnkit.engine.scan import (
    PROJECTED_MAX_INPUTS,
    log_space_scan,
    minimal_layer,
    minimal_layer_scan,
    native_scan_available,
    sequential_linear_recurrence,
)

LAYERS = {"mingru": (rnnkit.MinGRU, rnnkit.MinGRUCell), "minlstm": (rnnkit.MinLSTM, rnnkit.MinLSTMCell)}


def native_or_skip() -> None:
    if not native_scan_available(torch.zeros(1)):
        pytest.skip("the C++ scan cannot be built here (no compiler)")


def leaf(*shape: int) -> torch.Tensor:
    """A float64 randn tensor that gradcheck differentiates."""
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def gradcheck_and_opcheck(op, inputs: tuple[torch.Tensor, ...], *constants: object) -> None:
    """float64 gradcheck of ``op(*inputs, *constants)`` in ``inputs``, then torch's opcheck of
    the same call (schema, fake kernel, autograd registration)."""
    assert torch.autograd.gradcheck(lambda *a: op(*a, *constants), inputs)
    torch.library.opcheck(op, (*inputs, *constants))


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN and inf exactly where the reference has them, the finite values close."""
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = out.isfinite()
    torch.testing.assert_close(out[finite], ref[finite])


def assert_same_values_and_gradients(got: tuple[torch.Tensor, torch.Tensor],
                                     expected: tuple[torch.Tensor, torch.Tensor],
                                     inputs: tuple[torch.Tensor, ...]) -> None:
    """(out, final) equal the reference's, and so do the gradients of a random weighting of out
    plus final with respect to ``inputs`` (float64 tolerances)."""
    (out, final), (ref_out, ref_final) = got, expected
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum() + final.sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_final.sum(), inputs)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_log_space_scan_equals_sequential_recurrence_in_value_and_gradient(with_lengths: bool) -> None:
    torch.manual_seed(0)
    T, B, H = 9, 4, 3
    log_a = (-torch.rand(T, B, H, dtype=torch.float64) * 2).requires_grad_()
    log_b = torch.randn(T, B, H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)  # any sign: applied outside the log
    lengths = torch.tensor([9, 5, 1, 7]) if with_lengths else None
    out, final = log_space_scan(log_a, log_b, h0, lengths)
    ref_out, ref_final = sequential_linear_recurrence(log_a, log_b, h0, lengths)
    assert_same_values_and_gradients((out, final), (ref_out, ref_final), (log_a, log_b, h0))


def test_positive_activation_and_its_log() -> None:
    v = torch.linspace(-30, 30, 601, dtype=torch.float64)
    g = positive_activation(v)
    assert (g > 0).all()
    from rnnkit.cells.minimal import log_positive_activation

    torch.testing.assert_close(log_positive_activation(v), torch.log(g))


def test_minlstm_normalised_gates_sum_to_one() -> None:
    gx = torch.randn(5, 3 * 4, dtype=torch.float64) * 5
    log_forget, log_b = MinLSTMMath().coefficients(gx)
    k_f, k_i, v = gx.chunk(3, dim=-1)
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    torch.testing.assert_close(log_forget.exp(), f / (f + i))
    torch.testing.assert_close(log_b.exp(), i / (f + i) * positive_activation(v))


def test_mingru_step_is_the_paper_update() -> None:
    gx = torch.randn(5, 2 * 4, dtype=torch.float64)
    h = torch.randn(5, 4, dtype=torch.float64)
    k, v = gx.chunk(2, dim=-1)
    z = torch.sigmoid(k)
    expected = (1 - z) * h + z * positive_activation(v)
    torch.testing.assert_close(MinGRUMath().step(gx, h), expected)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("backend", ["auto", "log"])
def test_layer_equals_its_cells_unrolled(kind: str, bidirectional: bool, with_lengths: bool,
                                         backend: str) -> None:
    torch.manual_seed(1)
    layer_class, cell_class = LAYERS[kind]
    layer = layer_class(3, 5, num_layers=2, bidirectional=bidirectional, batch_first=True,
                        backend=backend).double()
    x = torch.randn(4, 7, 3, dtype=torch.float64)  # (B, T, I)
    lengths = torch.tensor([7, 2, 5, 1]) if with_lengths else None
    directions = 2 if bidirectional else 1
    h0 = torch.randn(2 * directions, 4, 5, dtype=torch.float64)
    output, h_n = layer(x, h0, lengths=lengths)
    assert output.shape == (4, 7, 5 * directions) and h_n.shape == (2 * directions, 4, 5)

    layer_input = x.transpose(0, 1)
    finals = []
    for depth in range(2):
        outs = []
        for direction in range(directions):
            suffix = f"_l{depth}" + ("_reverse" if direction else "")
            cell = cell_class(layer_input.shape[2], 5).double()
            with torch.no_grad():
                cell.weight_ih.copy_(getattr(layer, "weight_ih" + suffix))
                cell.bias_ih.copy_(getattr(layer, "bias_ih" + suffix))
            out, (final,) = rnnkit.unroll(cell, layer_input, (h0[depth * directions + direction],),
                                          lengths=lengths, reverse=direction == 1)
            outs.append(out)
            finals.append(final)
        layer_input = torch.cat(outs, dim=2)
    torch.testing.assert_close(output, layer_input.transpose(0, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_n, torch.stack(finals), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("backend", ["auto", "log"])
def test_layer_gradcheck_float64(kind: str, backend: str) -> None:
    torch.manual_seed(2)
    layer = LAYERS[kind][0](2, 3, num_layers=2, bidirectional=True, backend=backend).double()
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)

    def run(x: torch.Tensor, h0: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = dict(zip([name for name, _ in layer.named_parameters()], weights))
        output, h_n = torch.func.functional_call(layer, params, (x, h0), {"lengths": [5, 3, 1]})
        return output, h_n

    weights = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradcheck(run, (x, h0, *weights))


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("bias", [True, False])
def test_double_backward_of_the_native_scan_raises_not_zero(kind: str, bias: bool) -> None:
    """The C++ backward has no derivative: differentiating it again was silently zero (torch
    took its outputs as constants); now one error. The log-space scan is twice differentiable."""
    native_or_skip()
    torch.manual_seed(0)
    layer = LAYERS[kind][0](3, 4, bias=bias)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    layer.double()
    (grad,) = torch.autograd.grad(layer(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"not twice differentiable.*backend='log'"):
        torch.autograd.grad(grad.pow(2).sum(), x)
    layer.backend = "log"
    assert torch.autograd.gradgradcheck(lambda x: layer(x)[0], (x[:3],))


def test_long_float32_sequence_stays_close_to_the_step_loop() -> None:
    """T = 1000 in float32: the log-space scan is accurate where the gates have kept h for long."""
    torch.manual_seed(3)
    layer = rnnkit.MinGRU(8, 16)
    x = torch.randn(1000, 2, 8)
    output, h_n = layer(x)
    cell = rnnkit.MinGRUCell(8, 16)
    cell.load_state_dict({"weight_ih": layer.weight_ih_l0, "bias_ih": layer.bias_ih_l0})
    with torch.no_grad():
        reference, (final,) = rnnkit.unroll(cell.double(), x.double())
    torch.testing.assert_close(output.double(), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h_n[0].double(), final, rtol=1e-4, atol=1e-4)


def test_nan_input_poisons_the_state_from_its_step_on_only() -> None:
    layer = rnnkit.MinGRU(3, 4)
    x = torch.randn(6, 2, 3)
    x[3, 1, 0] = float("nan")
    output, h_n = layer(x)
    assert not output[:3].isnan().any() and not output[:, 0].isnan().any()
    assert output[3:, 1].isnan().all() and h_n[0, 1].isnan().all()


def test_cell_state_contract() -> None:
    cell = rnnkit.MinLSTMCell(3, 4)
    assert cell.state_size == 4 and cell.output_size == 4
    (h,) = cell.zero_state(2)
    out, (new_h,) = cell(torch.randn(2, 3), (h,))
    assert out.shape == (2, 4) and out is new_h
    with pytest.raises(ValueError, match="x_t"):
        cell(torch.randn(2, 5))


MATHS = {"mingru": MinGRUMath(), "minlstm": MinLSTMMath()}


@pytest.mark.parametrize("kind", sorted(MATHS))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_native_operator_equals_the_step_loop_in_value_and_gradient(kind: str, with_lengths: bool) -> None:
    native_or_skip()
    torch.manual_seed(5)
    math = MATHS[kind]
    T, B, H = 8, 3, 4
    gx = (torch.randn(T, B, math.num_gates * H, dtype=torch.float64) * 2).requires_grad_()
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([8, 3, 1]) if with_lengths else None
    out, final = minimal_layer_scan(math, gx, h0, lengths, backend="native")
    log_a, log_b = math.coefficients(gx)
    ref_out, ref_final = sequential_linear_recurrence(log_a, log_b, h0, lengths)
    assert_same_values_and_gradients((out, final), (ref_out, ref_final), (gx, h0))


@pytest.mark.parametrize("kind", sorted(MATHS))
def test_native_operator_gradcheck_and_opcheck(kind: str) -> None:
    native_or_skip()
    torch.manual_seed(4)
    gx, h0 = leaf(6, 2, MATHS[kind].num_gates * 3), leaf(2, 3)
    gradcheck_and_opcheck(torch.ops.rnnkit_scan.minimal_scan, (gx, h0), torch.tensor([6, 2]),
                          MATHS[kind].kernel_kind)


@pytest.mark.parametrize("kind", sorted(MATHS))
def test_native_operator_propagates_nan_and_inf_like_the_step_loop(kind: str) -> None:
    native_or_skip()
    math = MATHS[kind]
    gx = torch.randn(5, 2, math.num_gates * 3)
    gx[2, 0, 1] = float("nan")
    gx[3, 1, -1] = float("inf")  # an infinite candidate
    gx[1, 1, 0] = float("-inf")  # a saturated gate
    h0 = torch.zeros(2, 3)
    out, _ = minimal_layer_scan(math, gx, h0, backend="native")
    ref, _ = sequential_linear_recurrence(*math.coefficients(gx), h0)
    assert_same_nonfinite(out, ref)


@pytest.mark.parametrize("kind", sorted(MATHS))
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("input_grad", [False, True])
def test_fused_projection_equals_linear_then_scan(kind: str, with_lengths: bool, input_grad: bool) -> None:
    """The operator with W_ih inside (narrow inputs) against F.linear + the step-by-step loop."""
    native_or_skip()
    torch.manual_seed(6)
    math = MATHS[kind]
    T, B, inputs, H = 7, 3, 4, 5
    x = torch.randn(T, B, inputs, dtype=torch.float64, requires_grad=input_grad)
    weight = torch.randn(math.num_gates * H, inputs, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(math.num_gates * H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 2, 4]) if with_lengths else None
    out, final = minimal_layer(math, x, weight, bias, h0, lengths, backend="native")
    ref_out, ref_final = sequential_linear_recurrence(
        *math.coefficients(torch.nn.functional.linear(x, weight, bias)), h0, lengths)
    inputs = (x, weight, bias, h0) if input_grad else (weight, bias, h0)
    assert_same_values_and_gradients((out, final), (ref_out, ref_final), inputs)


@pytest.mark.parametrize("kind", sorted(MATHS))
def test_fused_projection_gradcheck_opcheck_and_nan(kind: str) -> None:
    native_or_skip()
    torch.manual_seed(7)
    math = MATHS[kind]
    x, weight_t, bias = leaf(6, 2, 3), leaf(3, math.num_gates * 4), leaf(math.num_gates * 4)
    gradcheck_and_opcheck(torch.ops.rnnkit_scan.minimal_scan_projected, (x, weight_t, bias, leaf(2, 4)),
                          torch.tensor([6, 3]), math.kernel_kind)
    # a NaN or inf input reaches every gate of its row through W_ih, as through the GEMM
    x = torch.randn(5, 2, 3)
    x[2, 0, 1], x[3, 1, 0] = float("nan"), float("inf")
    weight, bias, h0 = torch.randn(math.num_gates * 4, 3), torch.randn(math.num_gates * 4), torch.zeros(2, 4)
    out, _ = minimal_layer(math, x, weight, bias, h0, backend="native")
    ref, _ = sequential_linear_recurrence(*math.coefficients(torch.nn.functional.linear(x, weight, bias)), h0)
    assert_same_nonfinite(out, ref)


@pytest.mark.parametrize("kind", sorted(MATHS))
def test_fused_projection_skips_zero_inputs_only_where_that_is_exact(kind: str) -> None:
    """One-hot inputs skip the zero terms; an inf weight or a NaN gradient must still give the
    NaNs of F.linear (0 · inf = NaN in the forward, 0 · NaN in dW = x^T d)."""
    native_or_skip()
    torch.manual_seed(9)
    math = MATHS[kind]
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (6, 3)), 4).double()  # (T, B, 4)
    weight = torch.randn(math.num_gates * 5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(math.num_gates * 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(3, 5, dtype=torch.float64)

    def both(weight: torch.Tensor, grad: torch.Tensor) -> None:
        out, _ = minimal_layer(math, x, weight, bias, h0, backend="native")
        gx = torch.nn.functional.linear(x, weight, bias)
        ref, _ = sequential_linear_recurrence(*math.coefficients(gx), h0)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, equal_nan=True)
        got = torch.autograd.grad(out, weight, grad, allow_unused=True)[0]
        expected = torch.autograd.grad(ref, weight, grad)[0]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, equal_nan=True)

    both(weight, torch.randn(6, 3, 5, dtype=torch.float64))  # finite: the zero terms are skipped
    grad = torch.randn(6, 3, 5, dtype=torch.float64)
    grad[2, 1, 3] = float("nan")
    both(weight, grad)  # a NaN gradient reaches every column of dW, as through x^T d
    with torch.no_grad():
        infinite = weight.detach().clone()
        infinite[1, 2] = float("inf")
    both(infinite.requires_grad_(), torch.randn(6, 3, 5, dtype=torch.float64))


@pytest.mark.parametrize("input_size", [2, PROJECTED_MAX_INPUTS + 1])
def test_layer_native_equals_log_space_either_side_of_the_fused_projection(input_size: int) -> None:
    native_or_skip()
    torch.manual_seed(8)
    layer = rnnkit.MinGRU(input_size, 6, bias=False).double()
    log_layer = rnnkit.MinGRU(input_size, 6, bias=False, backend="log").double()
    log_layer.load_state_dict(layer.state_dict())
    x = torch.randn(9, 3, input_size, dtype=torch.float64, requires_grad=True)
    out, h_n = layer(x)
    ref, ref_h = log_layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h_n, ref_h, rtol=1e-9, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (x, layer.weight_ih_l0))
    expected = torch.autograd.grad(ref.sum(), (x, log_layer.weight_ih_l0))
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layers_and_cells_pickle_like_torch_nn(kind: str, tmp_path: Path) -> None:
    """torch.load(weights_only=True) needs only the rnnkit classes allowed, as for torch.nn.GRU."""
    layer_class, cell_class = LAYERS[kind]
    for module in (layer_class(3, 4, num_layers=2, bidirectional=True), cell_class(3, 4)):
        path = tmp_path / "module.pt"
        torch.save(module, path)
        with torch.serialization.safe_globals([type(module)]):
            loaded = torch.load(path, weights_only=True)
        x = torch.randn(5, 2, 3) if isinstance(module, layer_class) else torch.randn(2, 3)
        torch.testing.assert_close(loaded(x)[0], module(x)[0])


def test_empty_time_is_an_error_as_for_every_layer() -> None:
    with pytest.raises(ValueError, match="input"):
        rnnkit.MinGRU(3, 4)(torch.randn(0, 2, 3))


@pytest.mark.parametrize("kind", sorted(MATHS))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_one_hot_inputs_through_the_symbol_table_equal_the_step_loop(kind: str, with_lengths: bool) -> None:
    """One-hot rows make the operator use per-symbol gate tables; values and every gradient
    (x's too) against F.linear + the step loop, then gradcheck: its perturbed x is no longer
    one-hot, so the numerical side runs the row path and the analytical side the tables."""
    native_or_skip()
    torch.manual_seed(11)
    math = MATHS[kind]
    T, B, inputs, H = 9, 4, 5, 6
    x = torch.nn.functional.one_hot(torch.randint(0, inputs, (T, B)), inputs).double().requires_grad_()
    weight = torch.randn(math.num_gates * H, inputs, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(math.num_gates * H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 3, 1, 6]) if with_lengths else None
    out, final = minimal_layer(math, x, weight, bias, h0, lengths, backend="native")
    ref_out, ref_final = sequential_linear_recurrence(
        *math.coefficients(torch.nn.functional.linear(x, weight, bias)), h0, lengths)
    assert_same_values_and_gradients((out, final), (ref_out, ref_final), (x, weight, bias, h0))
    small = (x.detach()[:4, :2], weight.detach().t(), bias.detach(), h0.detach()[:2])
    gradcheck_and_opcheck(torch.ops.rnnkit_scan.minimal_scan_projected,
                          tuple(t.contiguous().requires_grad_() for t in small),
                          torch.empty(0, dtype=torch.long) if lengths is None else lengths[:2].clone(),
                          math.kernel_kind)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_hot_layer_equals_its_cell_stepped_as_in_generation(kind: str, dtype: torch.dtype) -> None:
    """Generation runs the cell one step at a time on one-hot symbols; the layer's scan over the
    same symbols (the per-symbol table path) gives the same outputs and final state."""
    torch.manual_seed(12)
    layer_class, cell_class = LAYERS[kind]
    layer = layer_class(10, 12).to(dtype)
    cell = cell_class(10, 12).to(dtype)
    with torch.no_grad():
        cell.weight_ih.copy_(layer.weight_ih_l0)
        cell.bias_ih.copy_(layer.bias_ih_l0)
    x = torch.nn.functional.one_hot(torch.randint(0, 10, (50, 4)), 10).to(dtype)  # (T, B, 10)
    h0 = torch.randn(1, 4, 12, dtype=dtype)
    output, h_n = layer(x, h0)
    stepped, (final,) = rnnkit.unroll(cell, x, (h0[0],))
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(output, stepped, **tolerance)
    torch.testing.assert_close(h_n[0], final, **tolerance)
