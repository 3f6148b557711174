"""Bad lengths, bad CTC targets and empty inputs: one clear error, or the empty result torch gives.

Issue 10: float lengths were truncated, a blank inside a CTC target gave a loss different from
torch's, the pure-torch CTC failed deep inside on bad labels, and empty sequences or batches
ended in tracebacks that differed by backend.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.engine import BACKENDS, run_layer
from rnnkit.losses.ctc import ctc_loss

CTC_BACKENDS = ("native", "python")


# ---- lengths ---------------------------------------------------------------------------------


NOT_INTEGERS = [
    ([3.0, 2.5], "lengths[0] = 3.0 is a float"),
    ((3.0, 2.0), "lengths[0] = 3.0 is a float"),
    ([3, 2.5], "lengths[1] = 2.5 is a float"),
    ([3, float("nan")], "lengths[1] = nan is a float"),
    ([True, 2], "lengths[0] = True is a bool"),
    ([3, "2"], "lengths[1] = '2' is a str"),
    (torch.tensor([3.0, 2.5]), "got dtype float32 (lengths[1] = 2.5)"),
    (torch.tensor([True, True]), "got dtype bool"),
    (np.array([3.0, 2.5]), "got dtype float64 (lengths[1] = 2.5)"),
    (np.array([3.0, 2.0], dtype=np.float32), "got dtype float32"),
    ([np.float64(3.0), 2], "lengths[0] = 3.0 is a float64"),
]


@pytest.mark.parametrize("lengths,message", NOT_INTEGERS, ids=[repr(c[0]) for c in NOT_INTEGERS])
def test_non_integer_lengths_are_rejected_everywhere(lengths, message):
    x = torch.randn(4, 2, 5)
    calls = {
        "layer": lambda: rnnkit.GRU(5, 3)(x, lengths=lengths),
        "unroll": lambda: rnnkit.unroll(rnnkit.GRUCell(5, 3), x, lengths=lengths),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="lengths must hold integers") as info:
            call()
        assert message in str(info.value), (name, str(info.value))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("lengths", [[3, 2], (3, 2), torch.tensor([3, 2]),
                                     torch.tensor([3, 2], dtype=torch.int32), np.array([3, 2]),
                                     [np.int64(3), np.int32(2)]],
                         ids=["list", "tuple", "tensor", "int32", "numpy", "numpy scalars"])
def test_integer_lengths_in_every_form_agree(lengths):
    torch.manual_seed(0)
    layer = rnnkit.GRU(5, 3)
    x = torch.randn(4, 2, 5)
    expected = layer(x, lengths=[3, 2])
    actual = layer(x, lengths=lengths)
    torch.testing.assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1])


# ---- CTC arguments ---------------------------------------------------------------------------


def _ctc_inputs():
    torch.manual_seed(0)
    log_probs = torch.randn(10, 2, 5).log_softmax(2)
    targets = torch.tensor([[1, 2, 3], [2, 2, 1]])
    return log_probs, targets


CTC_ERRORS = [
    ("float input length", dict(input_lengths=[9.7, 10]), TypeError,
     "input_lengths[0] = 9.7 is a float"),
    ("float target length tensor", dict(target_lengths=torch.tensor([3.0, 2.5])), TypeError,
     "target_lengths must hold integers, got dtype float32"),
    ("label is the blank", dict(targets=torch.tensor([[1, 0, 3], [2, 2, 1]])), ValueError,
     "target label 0 of sample 0 at position 1 is the blank"),
    ("label is the blank (blank=4)", dict(targets=torch.tensor([[1, 2, 3], [2, 4, 1]]), blank=4),
     ValueError, "target label 4 of sample 1 at position 1 is the blank"),
    ("negative label", dict(targets=torch.tensor([[1, -1, 3], [2, 2, 1]])), ValueError,
     "target label -1 of sample 0 at position 1 is outside the 5 classes"),
    ("label >= C", dict(targets=torch.tensor([[1, 2, 3], [2, 2, 5]])), ValueError,
     "target label 5 of sample 1 at position 2 is outside the 5 classes"),
    ("label >= C, concatenated", dict(targets=torch.tensor([1, 2, 3, 2, 7, 1])), ValueError,
     "target label 7 of sample 1 at position 1"),
    ("negative target length", dict(target_lengths=[-1, 3]), ValueError,
     "target_lengths[0] = -1 is negative"),
    ("negative input length", dict(input_lengths=[10, -2]), ValueError,
     "input_lengths[1] = -2 is negative"),
    ("input length > T", dict(input_lengths=[10, 11]), ValueError,
     "input_lengths[1] = 11 exceeds the 10 frames"),
    ("T = 0", dict(log_probs=torch.zeros(0, 2, 5), input_lengths=[0, 0]), ValueError,
     "log_probs is empty"),
    ("T = 0, zero_infinity", dict(log_probs=torch.zeros(0, 2, 5), input_lengths=[0, 0],
                                  zero_infinity=True), ValueError, "log_probs is empty"),
    ("float targets", dict(targets=torch.tensor([[1.0, 2, 3], [2, 2, 1]])), TypeError,
     "targets must hold integer class labels"),
    ("targets as a list", dict(targets=[[1, 2, 3], [2, 2, 1]]), TypeError,
     "targets must be a torch.Tensor, got list"),
    ("float blank", dict(blank=0.0), TypeError, "blank must be an int, got float"),
]


@pytest.mark.parametrize("backend", CTC_BACKENDS)
@pytest.mark.parametrize("case,changes,error,message", CTC_ERRORS,
                         ids=[c[0] for c in CTC_ERRORS])
def test_ctc_bad_arguments_give_one_clear_error_in_both_backends(backend, case, changes, error,
                                                                  message):
    log_probs, targets = _ctc_inputs()
    arguments = dict(log_probs=log_probs, targets=targets, input_lengths=[10, 10],
                     target_lengths=[3, 3])
    arguments.update(changes)
    with pytest.raises(error) as info:
        ctc_loss(**arguments, backend=backend)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", CTC_BACKENDS)
def test_ctc_zero_input_length_matches_torch(backend):
    log_probs, targets = _ctc_inputs()
    log_probs.requires_grad_()
    for target_lengths in ([0, 3], [3, 3]):
        expected = F.ctc_loss(log_probs, targets, [0, 10], target_lengths, reduction="none",
                              zero_infinity=True)
        actual = ctc_loss(log_probs, targets, [0, 10], target_lengths, reduction="none",
                          zero_infinity=True, backend=backend)
        torch.testing.assert_close(actual, expected)


# ---- empty inputs ----------------------------------------------------------------------------

LAYERS = {
    "RNN": (rnnkit.RNN, torch.nn.RNN, {}),
    "LSTM": (rnnkit.LSTM, torch.nn.LSTM, {}),
    "GRU": (rnnkit.GRU, torch.nn.GRU, {}),
    "LSTM peephole": (rnnkit.LSTM, None, {"peephole": True}),
    "GRU before": (rnnkit.GRU, None, {"reset": "before"}),
    "LSTM layer norm": (rnnkit.LSTM, None, {"layer_norm": True}),
    "GRU layer norm": (rnnkit.GRU, None, {"layer_norm": True}),
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
def test_empty_batch_gives_empty_results_like_torch(backend, name, dtype):
    ours, theirs, options = LAYERS[name]
    layer = ours(5, 4, num_layers=2, bidirectional=True, backend=backend, **options).to(dtype)
    x = torch.randn(3, 0, 5, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 falls back to the bptt engine, saying so
        output, final = layer(x)
        output.sum().backward()
        packed_output, _ = layer(torch.randn(3, 0, 5, dtype=dtype), lengths=[])
    finals = final if isinstance(final, tuple) else (final,)
    assert output.shape == (3, 0, 8) and packed_output.shape == (3, 0, 8)
    assert all(f.shape == (4, 0, 4) for f in finals)
    assert x.grad is not None and x.grad.shape == x.shape
    # no row, no gradient: exact zeros as torch.nn gives (the weight-gradient GEMMs have K = 0)
    for parameter_name, parameter in layer.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert not parameter.grad.any(), parameter_name
    if theirs is not None and dtype != torch.bfloat16:
        reference = theirs(5, 4, num_layers=2, bidirectional=True).to(dtype)
        expected, expected_final = reference(x)
        assert expected.shape == output.shape
        expected_final = expected_final if isinstance(expected_final, tuple) else (expected_final,)
        assert [f.shape for f in expected_final] == [f.shape for f in finals]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_zero_steps_is_one_clear_error_like_torch(backend, name):
    ours, theirs, options = LAYERS[name]
    layer = ours(5, 4, backend=backend, **options)
    for x in (torch.randn(0, 3, 5), torch.randn(0, 0, 5), torch.randn(0, 5)):
        with pytest.raises(ValueError, match="has sequence length 0") as info:
            layer(x)
        assert "\n" not in str(info.value)
        if theirs is not None:
            with pytest.raises(RuntimeError, match="sequence length to be larger than 0"):
                theirs(5, 4)(x)
    batch_first = ours(5, 4, batch_first=True, backend=backend, **options)
    with pytest.raises(ValueError, match="has sequence length 0"):
        batch_first(torch.randn(3, 0, 5))
    assert batch_first(torch.randn(0, 3, 5))[0].shape == (0, 3, 4)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_engine_seam_empty_inputs(backend):
    cell = rnnkit.LSTMCell(5, 4, peephole=True)
    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, *cell.diagonal_weights)
    state0 = (torch.zeros(0, 4), torch.zeros(0, 4))
    output, final = run_layer(cell.math, torch.randn(3, 0, 5), state0, params, None, backend)
    assert output.shape == (3, 0, 4) and [f.shape for f in final] == [(0, 4), (0, 4)]
    with pytest.raises(ValueError, match="x has sequence length 0"):
        run_layer(cell.math, torch.randn(0, 2, 5), (torch.zeros(2, 4),) * 2, params, None, backend)


def test_unroll_and_cells_with_empty_inputs():
    cell = rnnkit.LSTMCell(5, 4)
    with pytest.raises(ValueError, match="inputs has sequence length 0"):
        rnnkit.unroll(cell, torch.randn(0, 3, 5))
    output, state = rnnkit.unroll(cell, torch.randn(3, 0, 5))
    assert output.shape == (3, 0, 4) and state.h.shape == (0, 4)
    output, state = rnnkit.unroll(cell, torch.randn(3, 0, 5), lengths=[])
    assert output.shape == (3, 0, 4)
    for ours, theirs in ((rnnkit.RNNCell, torch.nn.RNNCell), (rnnkit.GRUCell, torch.nn.GRUCell),
                         (rnnkit.LSTMCell, torch.nn.LSTMCell)):
        x = torch.randn(0, 5)
        out, _ = ours(5, 4)(x)
        expected = theirs(5, 4)(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert out.shape == expected.shape == (0, 4)
