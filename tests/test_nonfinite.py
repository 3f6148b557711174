"""NaN and inf propagate through every backend exactly as through torch.nn (issue 10).

A kernel that drops a NaN (``x > 0 ? x : 0``) or turns ``0 * inf`` into a number gives a silently
wrong answer; these tests place one NaN / +inf / -inf in the input, the initial state or a weight
and require the same NaN mask, the same infinities and close finite values in the outputs, the
final states and every gradient, for every variant, backend and dtype.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import rnnkit
from conftest import VARIANTS

NAN, INF = float("nan"), float("inf")


def assert_same_values(expected: torch.Tensor | None, actual: torch.Tensor | None, what: str,
                       atol: float = 1e-4, rtol: float = 1e-3) -> None:
    """Same NaN mask, same infinities (with sign), close finite values."""
    assert (expected is None) == (actual is None), what
    if expected is None or actual is None:
        return
    assert expected.shape == actual.shape, what
    assert torch.equal(expected.isnan(), actual.isnan()), (
        f"{what}: NaN at {expected.isnan().sum()} places expected, {actual.isnan().sum()} given")
    for sign in (1, -1):
        assert torch.equal(expected == sign * INF, actual == sign * INF), f"{what}: {sign}*inf differ"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=rtol, msg=what)


def run_with_grads(module, x: torch.Tensor, hx: tuple[torch.Tensor, ...],
                   parameters=None) -> list[torch.Tensor | None]:
    """Outputs, final states and the gradients of their sum w.r.t. x, hx and every parameter.

    ``module`` is a module, or a callable ``(x, hx) -> (output, final)`` with ``parameters``
    its parameters' method.
    """
    x = x.detach().clone().requires_grad_()
    hx = tuple(h.detach().clone().requires_grad_() for h in hx)
    parameters = parameters or module.parameters
    for p in parameters():
        p.grad = None
    out, final = module(x, hx if len(hx) == 2 else hx[0])
    final = final if isinstance(final, tuple) else (final,)
    (out.sum() + sum(f.sum() for f in final)).backward()
    return [out.detach(), *(f.detach() for f in final), x.grad, *(h.grad for h in hx),
            *(p.grad for p in parameters())]


PLACES = ("input", "h0", "c0", "weight_ih", "weight_hh", "bias")
VALUES = (NAN, INF, -INF)
DTYPES = (torch.float32, torch.float64)


def poisoned(variant: str, place: str, value: float, dtype: torch.dtype):
    """(reference module, x, hx) with ``value`` written at one element of ``place``."""
    layer, _, options = VARIANTS[variant]
    torch.manual_seed(1)
    module = layer(6, 16, backend="reference", **options).to(dtype)
    x = torch.randn(5, 3, 6, dtype=dtype)
    hx = tuple(torch.randn(1, 3, 16, dtype=dtype) for _ in module.math.state_names)
    with torch.no_grad():
        target = {"input": x, "h0": hx[0], "c0": hx[-1], "weight_ih": module.weight_ih_l0,
                  "weight_hh": module.weight_hh_l0, "bias": module.bias_ih_l0}[place]
        target.view(-1)[target.numel() // 2 + 1] = value
    return module, x, hx


ALL_CASES = [
    (variant, place, value, dtype)
    for variant, place, value, dtype in itertools.product(
        sorted(VARIANTS), PLACES, VALUES, DTYPES)
    if place != "c0" or VARIANTS[variant][0] is rnnkit.LSTM
]
# The default run: every variant and place once, the value and dtype rotating with them (a sixth
# of the grid, each value and dtype about equally often); the whole grid is the slow test.
FAST_CASES = [
    (variant, place, VALUES[(v + p) % 3], DTYPES[(v + p // 3) % 2])
    for v, variant in enumerate(sorted(VARIANTS)) for p, place in enumerate(PLACES)
    if place != "c0" or VARIANTS[variant][0] is rnnkit.LSTM
]
SLOW_CASES = [pytest.param(*case, marks=pytest.mark.slow) for case in ALL_CASES
              if case not in FAST_CASES]


@pytest.mark.parametrize("variant,place,value,dtype", FAST_CASES + SLOW_CASES)
def test_nonfinite_propagates_like_reference_and_torch(variant, place, value, dtype):
    reference, x, hx = poisoned(variant, place, value, dtype)
    expected = run_with_grads(reference, x, hx)
    layer, _, options = VARIANTS[variant]
    candidates = {}
    for backend in ("fused", "bptt"):
        module = layer(6, 16, backend=backend, **options).to(dtype)
        module.load_state_dict(reference.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fallback warning where the kernel cannot build
            candidates[backend] = run_with_grads(module, x, hx)
    if reference._torch_compatibility_problem() is None:
        candidates["torch.nn"] = run_with_grads(reference.to_torch(), x, hx)
    names = ["output", *(f"final {s}" for s in reference.math.state_names), "d input",
             *(f"d {s}0" for s in reference.math.state_names),
             *(f"d {n}" for n, _ in reference.named_parameters())]
    for backend, values in candidates.items():
        for name, e, a in zip(names, expected, values):
            assert_same_values(e, a, f"{backend}: {name}")


@pytest.mark.parametrize("variant,place,value,dtype", FAST_CASES)
def test_nonfinite_propagates_through_the_batch_split(variant, place, value, dtype, monkeypatch):
    # the fused kernels' time loops on 2 threads, one block of the 3 rows each (2 + 1): a value
    # in one row stays in that row's block, and the gradients of the weights (summed over every
    # row after the loop) still see it
    from rnnkit.engine import fused
    from rnnkit.engine.fused import _function

    monkeypatch.setattr(_function, "loop_threads", 2)
    monkeypatch.setattr(fused, "use_native", False)
    reference, x, hx = poisoned(variant, place, value, dtype)
    expected = run_with_grads(reference, x, hx)
    layer, _, options = VARIANTS[variant]
    module = layer(6, 16, backend="fused", **options).to(dtype)
    module.load_state_dict(reference.state_dict())
    with fused.thread_split("batch"), warnings.catch_warnings():
        warnings.simplefilter("error")  # (no fallback: the kernel runs)
        got = run_with_grads(module, x, hx)
    for i, (e, a) in enumerate(zip(expected, got)):
        assert_same_values(e, a, f"value {i}")


def test_issue_example_fused_relu_keeps_nan():
    torch.manual_seed(0)
    m = rnnkit.RNN(6, 16, nonlinearity="relu")
    x = torch.randn(5, 3, 6)
    x[2, 1, 0] = NAN
    assert int(m(x)[0].isnan().sum()) == 48 == int(m.to_torch()(x)[0].isnan().sum())
    cell = rnnkit.RNNCell(6, 16, nonlinearity="relu")
    out, _ = cell(x[2])
    assert torch.equal(out.isnan(), torch.nn.RNNCell(6, 16, nonlinearity="relu")(x[2]).isnan())
    assert int(out.isnan().sum()) == 16


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "sigmoid"])
def test_fused_pointwise_functions_at_extremes(nonlinearity):
    """Every activation at ±inf, NaN, ±0 and the edges of the float exp range, as torch's."""
    special = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 88.5, -88.5,
                            -103.0, -104.5, 200.0, -200.0, 20.0, -20.0])
    for dtype in (torch.float32, torch.float64):
        # one unit, identity input weight, no recurrence: the output is the activation itself
        m = rnnkit.RNN(1, 1, nonlinearity=nonlinearity, bias=False).to(dtype)
        with torch.no_grad():
            m.weight_ih_l0.fill_(1.0)
            m.weight_hh_l0.fill_(0.0)
        x = special.to(dtype).view(1, -1, 1)
        out = m(x)[0].view(-1)
        expected = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}[
            nonlinearity](special.to(dtype))
        assert_same_values(expected, out, f"{nonlinearity} {dtype}", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("nonlinearity", ["tanh", "sigmoid"])
@pytest.mark.parametrize("grad", [False, True])
def test_fused_float_activations_on_a_dense_grid(nonlinearity, grad):
    """float32 tanh / sigmoid (pointwise.h's exp form) in the kernels' vectorised loops: within
    1.5e-7 of the float64 function over a dense grid of [-30, 30] (measured over every float
    there: 9.0e-8 tanh, 8.9e-8 sigmoid; onnxruntime's rational form, tried in session 14, is off
    by 3.3e-7 / 1.7e-7 there, and its tanh fails this), and ±inf / NaN as torch's (exactly), in
    the inference and the training kernels."""
    grid = torch.cat([torch.linspace(-30, 30, 120_001),
                      torch.tensor([NAN, INF, -INF, 0.0, -0.0, 9.0, -9.0, 18.0, -18.0, 1e-30])])
    # each row one grid value on 16 units (identity input weight, no recurrence): the units'
    # loop runs in full ymm vectors
    m = rnnkit.RNN(1, 16, nonlinearity=nonlinearity, bias=False)
    with torch.no_grad():
        m.weight_ih_l0.fill_(1.0)
        m.weight_hh_l0.fill_(0.0)
    x = grid.view(1, -1, 1).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = m(x)[0].detach().view(-1, 16)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=0, equal_nan=True)
    expected = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}[nonlinearity](grid.double())
    assert_same_values(expected, out[:, 0].double(), nonlinearity, atol=1.5e-7, rtol=0)
    special = out[-10:, 0]
    want = {"tanh": [1.0, -1.0], "sigmoid": [1.0, 0.0]}[nonlinearity]
    assert special[0].isnan() and special[1] == want[0] and special[2] == want[1]  # exact


# ---- CTC ---------------------------------------------------------------------------------------


def _ctc_case(name: str, dtype: torch.dtype):
    """(log_probs, targets, input_lengths, target_lengths) with the issue's non-finite inputs."""
    torch.manual_seed(0)
    log_probs = torch.randn(10, 3, 5, dtype=dtype).log_softmax(2)
    targets = torch.tensor([[1, 2, 3], [2, 2, 1], [4, 1, 1]])
    if name == "one NaN":
        log_probs[3, 0, 1] = NAN
    elif name == "NaN in the first frame":
        log_probs[0, 1, 0] = NAN
    elif name == "all NaN":
        log_probs.fill_(NAN)
    elif name == "NaN past an input length":
        log_probs[8, 2, 2] = NAN
    elif name == "+inf":
        log_probs[4, 0, 2] = INF
    elif name == "-inf on a path":
        log_probs[:, 1, 2] = -INF  # sample 1 can never emit its label 2: an infinite loss
    elif name == "-inf in a class":
        log_probs[2, 0, 4] = -INF
    elif name == "unnormalised, overflowing exp":  # finite, but exp(lp) is inf in float32
        log_probs = log_probs * 100 + 20
    elif name == "mixed":
        log_probs[1, 0, 0], log_probs[5, 1, 1], log_probs[6, 2, 4] = INF, -INF, NAN
    return log_probs, targets, [10, 9, 7], [3, 3, 3]


CTC_CASES = ["one NaN", "NaN in the first frame", "all NaN", "NaN past an input length", "+inf",
             "-inf on a path", "-inf in a class", "unnormalised, overflowing exp", "mixed"]


@pytest.mark.parametrize("backend", ["native", "python"])
@pytest.mark.parametrize("zero_infinity", [False, True], ids=["plain", "zero_infinity"])
@pytest.mark.parametrize("case", CTC_CASES)
def test_ctc_nonfinite_like_torch(case, zero_infinity, backend):
    from rnnkit.losses.ctc import ctc_loss

    for dtype in (torch.float32, torch.float64):
        log_probs, targets, input_lengths, target_lengths = _ctc_case(case, dtype)
        for reduction in ("none", "mean", "sum"):
            expected_input = log_probs.clone().requires_grad_()
            expected = torch.nn.functional.ctc_loss(
                expected_input, targets, input_lengths, target_lengths, reduction=reduction,
                zero_infinity=zero_infinity)
            expected.sum().backward()
            actual_input = log_probs.clone().requires_grad_()
            actual = ctc_loss(actual_input, targets, input_lengths, target_lengths,
                              reduction=reduction, zero_infinity=zero_infinity, backend=backend)
            actual.sum().backward()
            what = f"{case} {dtype} {reduction}"
            assert_same_values(expected.detach(), actual.detach(), f"loss, {what}")
            assert_same_values(expected_input.grad, actual_input.grad, f"gradient, {what}")


@pytest.mark.parametrize("backend", ["fused", "bptt", "reference"])
@pytest.mark.parametrize("variant", ["rnn_relu", "lstm", "gru_after"])
def test_nonfinite_padding_changes_nothing_like_packed_torch(variant, backend):
    """NaN / inf past a sequence's length: as a packed sequence in torch.nn, nothing sees it."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    layer, _, options = VARIANTS[variant]
    torch.manual_seed(0)
    module = layer(4, 6, bidirectional=True, backend=backend, **options)
    x = torch.randn(5, 3, 4)
    x[4, 1], x[3:, 2, 1] = NAN, INF  # row 1 has length 3, row 2 length 3
    lengths = [5, 3, 3]
    ours = run_with_grads(lambda x, h: module(x, h, lengths=lengths), x,
                          tuple(torch.zeros(2, 3, 6) for _ in module.math.state_names),
                          module.parameters)
    theirs_module = module.to_torch()

    def packed(x, h):
        out, final = theirs_module(pack_padded_sequence(x, lengths, enforce_sorted=False), h)
        return pad_packed_sequence(out, total_length=5)[0], final

    theirs = run_with_grads(packed, x, tuple(torch.zeros(2, 3, 6) for _ in module.math.state_names),
                            theirs_module.parameters)
    for i, (e, a) in enumerate(zip(theirs, ours)):
        assert_same_values(e, a, f"value {i}")
        assert not a.isnan().any()


@pytest.mark.parametrize("reverse", [False, True])
def test_unroll_ignores_nonfinite_padding(reverse):
    """unroll with lengths: NaN / inf in the padding reach neither outputs nor any gradient."""
    torch.manual_seed(0)
    cell = rnnkit.StackedCell([rnnkit.LSTMCell(4, 5, peephole=True), rnnkit.GRUCell(5, 3)])
    clean = torch.randn(5, 3, 4)
    lengths = [5, 2, 4]
    poisoned = clean.clone()
    poisoned[2:, 1], poisoned[4, 2, 0] = NAN, INF
    results = []
    for x in (clean, poisoned):
        x = x.clone().requires_grad_()
        cell.zero_grad(set_to_none=True)
        out, state = rnnkit.unroll(cell, x, lengths=lengths, reverse=reverse)
        loss = out.sum() + sum(s.sum() for layer in state for s in layer)
        loss.backward()
        results.append([out.detach(), x.grad, *(p.grad for p in cell.parameters())])
    for clean_value, poisoned_value in zip(*results):
        assert_same_values(clean_value, poisoned_value, "unroll with poisoned padding")
