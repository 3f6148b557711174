"""The engine: hand-derived BPTT against the autograd reference, and gradcheck through it."""

from __future__ import annotations

import pytest
import torch

from conftest import VARIANTS
from rnnkit.engine import run_layer, set_default_backend
from rnnkit.engine.lengths import (
    batch_sizes_for,
    reverse_within_lengths,
    sort_by_length,
    sort_rows,
    torch_order,
)

BATCH_SIZES = [5, 5, 4, 2, 2, 1]  # lengths 6, 5, 3, 3, 2


def _layer_inputs(variant: str, dtype: torch.dtype, bias: bool = True, steps: int = 6,
                  batch: int = 5, inputs: int = 3, hidden: int = 4):
    layer_class, _, options = VARIANTS[variant]
    layer = layer_class(inputs, hidden, bias=bias, **options).to(dtype)
    x = torch.randn(steps, batch, inputs, dtype=dtype, requires_grad=True)
    state0 = tuple(torch.randn(batch, hidden, dtype=dtype, requires_grad=True)
                   for _ in layer.math.state_names)
    return layer.math, x, state0, layer.layer_params(0, 0)


def _outputs_and_grads(backend, math, x, state0, params, batch_sizes):
    outputs, final = run_layer(math, x, state0, params, batch_sizes, backend)
    loss = (outputs * torch.linspace(-1, 1, outputs.numel(), dtype=outputs.dtype)
            .view_as(outputs)).sum() + sum((f * f).sum() for f in final)
    wanted = [t for t in (x, *state0, *params) if t is not None]
    return (outputs, *final), torch.autograd.grad(loss, wanted)


@pytest.mark.parametrize("batch_sizes", [None, BATCH_SIZES], ids=["full", "lengths"])
@pytest.mark.parametrize("bias", [True, False])
def test_bptt_equals_reference(variant: str, batch_sizes, bias: bool) -> None:
    inputs = _layer_inputs(variant, torch.float64, bias)
    got = _outputs_and_grads("bptt", *inputs, batch_sizes)
    expected = _outputs_and_grads("reference", *inputs, batch_sizes)
    for g, e in zip([*got[0], *got[1]], [*expected[0], *expected[1]]):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_bptt_equals_reference_float32(variant: str) -> None:
    inputs = _layer_inputs(variant, torch.float32, steps=12, batch=6, inputs=7, hidden=16)
    sizes = [6] * 5 + [4] * 4 + [1] * 3
    got = _outputs_and_grads("bptt", *inputs, sizes)
    expected = _outputs_and_grads("reference", *inputs, sizes)
    for g, e in zip([*got[0], *got[1]], [*expected[0], *expected[1]]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_sizes", [None, [3, 3, 2, 1]], ids=["full", "lengths"])
def test_gradcheck_through_bptt(variant: str, batch_sizes) -> None:
    math, x, state0, params = _layer_inputs(variant, torch.float64, steps=4, batch=3, inputs=2,
                                            hidden=3)
    params = tuple(p.detach().requires_grad_() for p in params)
    count = len(state0)

    def layer(x, *rest):
        outputs, final = run_layer(math, x, rest[:count], rest[count:], batch_sizes, "bptt")
        return (outputs, *final)

    assert torch.autograd.gradcheck(layer, (x, *state0, *params))


def test_inference_path_saves_nothing_and_matches(variant: str) -> None:
    math, x, state0, params = _layer_inputs(variant, torch.float64)
    with torch.no_grad():
        outputs, final = run_layer(math, x, state0, params, BATCH_SIZES, "bptt")
    assert outputs.grad_fn is None
    expected, expected_final = run_layer(math, x, state0, params, BATCH_SIZES, "reference")
    torch.testing.assert_close(outputs, expected)
    for f, e in zip(final, expected_final):
        torch.testing.assert_close(f, e)


def test_rows_past_their_length_keep_state_and_output_zero() -> None:
    math, x, state0, params = _layer_inputs("lstm", torch.float64)
    outputs, final = run_layer(math, x, state0, params, BATCH_SIZES, "bptt")
    assert not outputs[5, 1:].any() and not outputs[2:, 4].any()
    # the last row runs two steps only: its final state is the state after step 1
    _, alone_final = run_layer(math, x[:2, 4:], tuple(s[4:] for s in state0), params)
    torch.testing.assert_close(final[1][4:], alone_final[1])


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown engine backend 'cuda-magic'"):
        set_default_backend("cuda-magic")


def test_length_helpers() -> None:
    lengths = torch.tensor([2, 5, 3, 5])
    sorted_lengths, order, inverse = sort_by_length(lengths)
    assert sorted_lengths.tolist() == [5, 5, 3, 2]
    assert order.tolist() == [1, 3, 2, 0]  # stable among equal lengths
    assert lengths[order][inverse].tolist() == lengths.tolist()
    assert batch_sizes_for(sorted_lengths, 5) == [4, 4, 3, 2, 2]
    assert batch_sizes_for(torch.tensor([3, 3]), 3) is None
    x = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 1)
    flipped = reverse_within_lengths(x, torch.tensor([4, 2]))
    assert flipped[:, 0, 0].tolist() == [3, 2, 1, 0]
    assert flipped[:, 1, 0].tolist() == [1, 0, 2, 3]


def test_sort_rows_is_sort_by_length_on_ints() -> None:
    """The layers' eager order, inverse, sorted lengths and batch sizes from Python ints are
    sort_by_length's and batch_sizes_for's (stable ties, also from 17 rows on; torch.nn's order
    when given); None where no copy or no skipping is needed."""
    gen = torch.Generator().manual_seed(15)
    cases = [torch.randint(1, steps + 1, (batch,), generator=gen)
             for batch, steps in ((1, 1), (5, 3), (40, 12), (200, 50))]
    cases += [torch.tensor([4, 4, 2, 1]), torch.tensor([3, 3, 3]), torch.tensor([1, 3, 3]),
              torch.zeros(0, dtype=torch.long)]
    for lengths in cases:
        steps = int(lengths.max()) if lengths.numel() else 2
        for given in (None, torch_order(lengths, None, False)):
            order, inverse, sorted_values, batch_sizes = sort_rows(
                lengths.tolist(), steps, None if given is None else given.tolist())
            want_sorted, want_order, want_inverse = sort_by_length(lengths, given)
            assert sorted_values == want_sorted.tolist()
            assert batch_sizes == batch_sizes_for(want_sorted, steps)
            if order is None:
                assert want_order.tolist() == list(range(lengths.numel()))
                assert inverse is None
            else:
                assert order == want_order.tolist()
                assert inverse == want_inverse.tolist()
    assert sort_rows([2, 3, 3], 3)[:2] == ([1, 2, 0], [2, 0, 1])  # (a case that is not None)


def test_fused_is_the_default_and_falls_back_with_one_warning(monkeypatch) -> None:
    import warnings

    from rnnkit import engine
    from rnnkit.engine import fused

    assert engine.get_default_backend() == "fused"
    math, x, state0, params = _layer_inputs("lstm_coupled", torch.float64)
    expected, _ = run_layer(math, x, state0, params, BATCH_SIZES, "bptt")
    monkeypatch.setattr(fused, "unavailable_reason", lambda *args: "compiler not found")
    monkeypatch.setattr(engine, "_fallbacks_warned", set())
    with pytest.warns(RuntimeWarning, match=r"cannot run here \(compiler not found\)"):
        outputs, _ = run_layer(math, x, state0, params, BATCH_SIZES)
    torch.testing.assert_close(outputs, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every call
        run_layer(math, x, state0, params, BATCH_SIZES)


def test_activations_are_freed_without_the_garbage_collector() -> None:
    # A returned final state that the step caches also hold would form a reference cycle that
    # only the cyclic collector frees — which tensors hardly ever trigger, so memory piles up.
    import gc
    import weakref

    math, x, state0, params = _layer_inputs("rnn_tanh", torch.float64)
    gc.collect()
    gc.disable()
    try:
        outputs, final = run_layer(math, x, state0, params, None, "bptt")
        node = weakref.ref(final[0].grad_fn)
        (outputs.sum() + final[0].sum()).backward()
        del outputs, final
        assert node() is None
    finally:
        gc.enable()
