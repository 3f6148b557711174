"""linear_cross_entropy (class-major output layer + loss) against torch's composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnkit.losses.cross_entropy import linear_cross_entropy
from rnnkit.models.language_model import LanguageModel, LMConfig
from rnnkit.tasks import copymemory

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _reference(hidden, weight, bias, targets):  # type: ignore[no-untyped-def]
    return F.cross_entropy(F.linear(hidden, weight, bias), targets)


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, bias: bool = True):  # type: ignore[no-untyped-def]
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, dtype=dtype, requires_grad=True)
    b = torch.randn(v, dtype=dtype, requires_grad=True) if bias else None
    return hidden, weight, b, torch.randint(0, v, (n,))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_loss_and_gradients_equal_torch(bias: bool, dtype: torch.dtype, tolerance: float) -> None:
    hidden, weight, b, targets = _inputs(300, 17, 10, dtype, bias)
    ours = linear_cross_entropy(hidden, weight, b, targets)
    theirs = _reference(hidden, weight, b, targets)
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    upstream = torch.tensor(1.7, dtype=dtype)  # a scaled loss: the gradient's factor must carry
    ours_grads = torch.autograd.grad(ours * upstream, leaves)
    theirs_grads = torch.autograd.grad(theirs * upstream, leaves)
    for mine, reference in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(mine, reference, rtol=tolerance, atol=tolerance)


def test_gradcheck_float64() -> None:
    hidden, weight, b, targets = _inputs(12, 5, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda h, w, c: linear_cross_entropy(h, w, c, targets),
                                     (hidden, weight, b))


def test_empty_input_gives_nan_as_torch() -> None:
    hidden, weight, b, targets = _inputs(0, 5, 4, torch.float32)
    assert linear_cross_entropy(hidden, weight, b, targets).isnan()
    assert _reference(hidden, weight, b, targets).isnan()


def test_only_the_inputs_that_need_a_gradient_get_one() -> None:
    hidden, weight, b, targets = _inputs(20, 6, 3, torch.float32)
    weight.requires_grad_(False)
    (grad_hidden, grad_bias) = torch.autograd.grad(
        linear_cross_entropy(hidden, weight, b, targets), (hidden, b))
    assert grad_hidden.shape == hidden.shape and grad_bias.shape == b.shape


def _assert_same_values_and_gradients(ours: torch.Tensor, theirs: torch.Tensor,
                                      inputs: tuple[torch.Tensor, ...]) -> None:
    """Equal losses and gradients, NaN in exactly the same places."""
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    for mine, reference in zip(torch.autograd.grad(ours, inputs),
                               torch.autograd.grad(theirs, inputs)):
        assert torch.equal(mine.isnan(), reference.isnan())
        torch.testing.assert_close(mine, reference, equal_nan=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_values_propagate_as_in_torch(value: float, dtype: torch.dtype) -> None:
    hidden, weight, b, targets = _inputs(30, 7, 5, dtype)
    with torch.no_grad():
        hidden[4, 2] = value
    ours = linear_cross_entropy(hidden, weight, b, targets)
    theirs = _reference(hidden, weight, b, targets)
    _assert_same_values_and_gradients(ours, theirs, (hidden, weight, b))


def test_bad_shapes_and_targets_are_named() -> None:
    hidden, weight, b, targets = _inputs(8, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight.t(), b, targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, b, targets[:5])
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        linear_cross_entropy(hidden, weight, b, targets.clone().fill_(3))


@pytest.mark.parametrize("cell", ["gru", "mingru"])
def test_copy_memory_loss_is_the_models_cross_entropy(cell: str) -> None:
    """The task's loss is unchanged: F.cross_entropy of the model's logits over every step."""
    model = LanguageModel(LMConfig(vocab_size=copymemory.SYMBOLS, cell=cell, layers=1, hidden=9,
                                   embedding=0))
    batch = copymemory.generate(4, 15, torch.Generator().manual_seed(1))
    loss, count = copymemory.cross_entropy(model, batch)
    logits, _ = model(batch.inputs)
    reference = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
    assert count == 35 * 4
    torch.testing.assert_close(loss, reference)
    params = list(model.parameters())
    for mine, theirs in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_one_hot_input_equals_torchs() -> None:
    from rnnkit.models.language_model import one_hot

    tokens = torch.randint(0, 7, (13, 5))
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(one_hot(tokens, 7, dtype), F.one_hot(tokens, 7).to(dtype))
    assert one_hot(tokens[:0], 7, torch.float32).shape == (0, 5, 7)
    with pytest.raises(IndexError, match="out of range"):
        one_hot(tokens.clone().fill_(7), 7, torch.float32)
    with pytest.raises(IndexError, match="out of range"):
        one_hot(tokens.clone().fill_(-1), 7, torch.float32)


def test_a_second_backward_sees_the_same_gradient() -> None:
    hidden, weight, b, targets = _inputs(40, 6, 5, torch.float64)
    loss = linear_cross_entropy(hidden, weight, b, targets)
    first = torch.autograd.grad(loss, (hidden, weight, b), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight, b))
    for one, two in zip(first, second):
        assert torch.equal(one, two)


def _native_or_skip() -> None:
    from rnnkit.losses.cross_entropy import _EXTENSION

    if _EXTENSION.load() is None:
        pytest.skip(f"the C++ linear_cross_entropy is unavailable: {_EXTENSION.error}")


@pytest.mark.parametrize(("n", "h", "v"), [(1, 3, 1), (258, 9, 16), (1030, 66, 10), (7, 8, 2)])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_operator_equals_torch(n: int, h: int, v: int, dtype: torch.dtype, tolerance: float) -> None:
    """The C++ pass at sizes that cross its blocks: rows not a multiple of 4 nor of the 256-row
    chunks, H not a multiple of the vector width, 1 and 16 classes (its padded maximum)."""
    _native_or_skip()
    hidden, weight, b, targets = _inputs(n, h, v, dtype)
    ours = linear_cross_entropy(hidden, weight, b, targets, backend="native")
    theirs = _reference(hidden, weight, b, targets)
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    for factor in (1.0, -0.3):  # 1: the saved gradients returned as they are; else scaled
        ours_grads = torch.autograd.grad(ours * factor, (hidden, weight, b), retain_graph=True)
        theirs_grads = torch.autograd.grad(theirs * factor, (hidden, weight, b), retain_graph=True)
        for mine, reference in zip(ours_grads, theirs_grads):
            torch.testing.assert_close(mine, reference, rtol=tolerance, atol=tolerance)


def test_fused_gradcheck_float64() -> None:
    _native_or_skip()
    hidden, weight, b, targets = _inputs(13, 5, 4, torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, c: linear_cross_entropy(h, w, c, targets, backend="native"), (hidden, weight, b))


def test_fused_without_bias_and_partial_gradients() -> None:
    _native_or_skip()
    hidden, weight, _, targets = _inputs(37, 6, 5, torch.float64, bias=False)
    for wants in ((hidden,), (weight,), (hidden, weight)):
        loss = linear_cross_entropy(hidden, weight, None, targets, backend="native")
        ours = torch.autograd.grad(loss, wants)
        theirs = torch.autograd.grad(_reference(hidden, weight, None, targets), wants)
        for mine, reference in zip(ours, theirs):
            torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the loss alone
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, None, targets, backend="native"),
                                   _reference(hidden, weight, None, targets), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["hidden", "bias"])
def test_fused_non_finite_values_propagate_as_in_torch(value: float, dtype: torch.dtype, where: str) -> None:
    _native_or_skip()
    hidden, weight, b, targets = _inputs(30, 7, 5, dtype)
    with torch.no_grad():
        if where == "hidden":
            hidden[4, 2] = value
        else:  # an infinite logit in every row: its class wins (or loses) outright
            b[int(targets[0])] = value
    ours = linear_cross_entropy(hidden, weight, b, targets, backend="native")
    theirs = _reference(hidden, weight, b, targets)
    _assert_same_values_and_gradients(ours, theirs, (hidden, weight, b))


def test_a_nan_upstream_factor_reaches_every_gradient() -> None:
    _native_or_skip()
    hidden, weight, b, targets = _inputs(9, 4, 3, torch.float32)
    loss = linear_cross_entropy(hidden, weight, b, targets, backend="native")
    for grad in torch.autograd.grad(loss * float("nan"), (hidden, weight, b)):
        assert grad.isnan().all()


def test_more_classes_than_the_kernel_takes_use_the_torch_form() -> None:
    hidden, weight, b, targets = _inputs(20, 4, 17, torch.float64)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, b, targets),
                               _reference(hidden, weight, b, targets), rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="at most 16"):
        linear_cross_entropy(hidden, weight, b, targets, backend="native")
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(hidden, weight, b, targets, backend="gpu")


def test_fused_second_backward_recomputes_the_same_scaled_gradient() -> None:
    _native_or_skip()
    hidden, weight, b, targets = _inputs(21, 6, 5, torch.float64)
    loss = linear_cross_entropy(hidden, weight, b, targets, backend="native") * 2.5
    first = torch.autograd.grad(loss, (hidden, weight, b), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight, b))
    reference = torch.autograd.grad(_reference(hidden, weight, b, targets) * 2.5, (hidden, weight, b))
    for one, two, three in zip(first, second, reference):
        assert torch.equal(one, two)
        torch.testing.assert_close(one, three, rtol=1e-12, atol=1e-12)
