"""The chrono initialisation of the gate biases (Tallec & Ollivier 2018): drawn as specified,
reproducible under a seed, reaching the layers from the configs, and only a starting point
(the layers stay equal to torch.nn given the same weights)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import rnnkit
from rnnkit.cells.minimal import MinGRUMath, MinLSTMMath
from rnnkit.models.language_model import LanguageModel, LMConfig
from rnnkit.models.recurrent import RecurrentConfig, build_recurrent

T_MAX = 600.0

# name -> (layer class, options, {gate block: sign of log u in its total bias})
GATED = {
    "lstm": (rnnkit.LSTM, {}, {1: 1.0, 0: -1.0}),  # i, f, g, o: b_f = log u, b_i = −b_f
    "lstm_coupled": (rnnkit.LSTM, {"coupled": True}, {0: -1.0}),  # i, g, o: f = 1 − i
    "lstm_peephole": (rnnkit.LSTM, {"peephole": True}, {1: 1.0, 0: -1.0}),
    "lstm_layer_norm": (rnnkit.LSTM, {"layer_norm": True}, {1: 1.0, 0: -1.0}),
    "gru": (rnnkit.GRU, {}, {1: 1.0}),  # r, z, n: z keeps h_{t-1}
    "gru_before": (rnnkit.GRU, {"reset": "before"}, {1: 1.0}),
    "gru_layer_norm": (rnnkit.GRU, {"layer_norm": True}, {1: 1.0}),
    "mingru": (rnnkit.MinGRU, {}, {0: -1.0}),  # k, v: z = σ(k) updates h
    "minlstm": (rnnkit.MinLSTM, {}, {0: 1.0, 1: -1.0}),  # k_f, k_i, v
}


def _total_bias(layer: torch.nn.Module, suffix: str) -> torch.Tensor:
    """The bias each gate's pre-activation starts with: the sum of the layer's two vectors."""
    parameters = dict(layer.named_parameters())
    names = ("ln_ih_bias", "ln_hh_bias") if getattr(layer.math, "layer_norm", False) else (
        "bias_ih", "bias_hh")
    total = parameters[names[0] + suffix].detach().clone()
    if names[1] + suffix in parameters:
        total += parameters[names[1] + suffix].detach()
    return total


@pytest.mark.parametrize("name", GATED)
def test_chrono_biases_are_log_uniform_and_the_rest_untouched(name: str) -> None:
    layer_class, options, gates = GATED[name]
    hidden = 1000
    torch.manual_seed(3)
    plain = layer_class(2, hidden, num_layers=2, bidirectional=True, **options)
    torch.manual_seed(3)
    chrono = layer_class(2, hidden, num_layers=2, bidirectional=True, chrono=T_MAX, **options)
    draws = []
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        total, before = _total_bias(chrono, suffix), _total_bias(plain, suffix)
        block, sign = next(iter(gates.items()))
        u = (sign * total[block * hidden:(block + 1) * hidden]).exp()  # (H,)
        assert u.min() >= 1.0 and u.max() <= T_MAX - 1
        for block, sign in gates.items():
            torch.testing.assert_close(total[block * hidden:(block + 1) * hidden], sign * u.log())
        others = [b for b in range(total.numel() // hidden) if b not in gates]
        for block in others:  # the other gates keep the plain initialisation
            rows = slice(block * hidden, (block + 1) * hidden)
            torch.testing.assert_close(total[rows], before[rows])
        draws.append(u)
    assert all(not torch.equal(draws[0], other) for other in draws[1:])  # one draw per direction
    # u ~ U[1, T_max − 1]: a Kolmogorov–Smirnov test of the 4,000 draws (fixed seed; the range
    # is checked above; log u uniform instead, the other reading of the paper, gives p ≈ 0)
    pooled = torch.cat(draws).double().numpy()
    assert stats.kstest(pooled, stats.uniform(1.0, T_MAX - 2).cdf).pvalue > 1e-4
    for (key, value), (_, plain_value) in zip(chrono.named_parameters(), plain.named_parameters()):
        if "bias" not in key:  # weights as without chrono (its draws come after theirs)
            torch.testing.assert_close(value, plain_value)


@pytest.mark.parametrize("math_class", [MinGRUMath, MinLSTMMath])
def test_minimal_keep_factor_is_the_chrono_time_scale(math_class: type) -> None:
    """At zero input the minimal cells keep h by a = σ(log u) = u / (1 + u) per step, so a unit
    forgets over 1 / (1 − a) = 1 + u steps: 2 … T_max, as in the LSTM with b_f = log u."""
    torch.manual_seed(0)
    layer = rnnkit.MinGRU(2, 50, chrono=T_MAX) if math_class is MinGRUMath else rnnkit.MinLSTM(
        2, 50, chrono=T_MAX)
    log_keep, _ = math_class().coefficients(layer.bias_ih_l0.detach())
    keep = log_keep.exp().double()
    lstm = rnnkit.LSTM(2, 50, chrono=T_MAX)
    forget = torch.sigmoid(lstm.bias_ih_l0[50:100].detach().double())
    for factor in (keep, forget):
        steps = 1 / (1 - factor)
        assert steps.min() >= 2 - 1e-9 and steps.max() <= T_MAX + 1e-6


def test_chrono_is_reproducible_under_a_seed() -> None:
    def made(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return rnnkit.LSTM(3, 16, num_layers=2, chrono=100).state_dict()

    first, again, other = made(5), made(5), made(6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["bias_ih_l0"], other["bias_ih_l0"])


@pytest.mark.parametrize("layer_class", [rnnkit.LSTM, rnnkit.GRU])
def test_a_chrono_layer_equals_torch_nn_with_its_weights(layer_class: type) -> None:
    torch.manual_seed(1)
    layer = layer_class(3, 8, num_layers=2, chrono=50)
    native = layer.to_torch()
    x = torch.randn(20, 4, 3, requires_grad=True)
    output, _ = layer(x)
    expected, _ = native(x)
    torch.testing.assert_close(output, expected)
    (grad,) = torch.autograd.grad(output.square().sum(), layer.bias_ih_l0)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), native.bias_ih_l0)
    torch.testing.assert_close(grad, expected_grad)
    # and torch.nn's layer given chrono biases by hand is the same model
    hand = layer_class.torch_class(3, 8, num_layers=2)
    hand.load_state_dict(layer.state_dict())
    torch.testing.assert_close(hand(x)[0], output)


def test_chrono_refused_where_it_means_nothing() -> None:
    with pytest.raises(TypeError, match="chrono"):
        rnnkit.RNN(2, 4, chrono=10)
    with pytest.raises(ValueError, match="forget_bias and chrono"):
        rnnkit.LSTM(2, 4, forget_bias=1.0, chrono=10)
    with pytest.raises(ValueError, match="T_max >= 2"):
        rnnkit.GRU(2, 4, chrono=1.5)
    for wrong in ("600", True, None.__class__):
        with pytest.raises(ValueError, match="chrono must be a number"):
            rnnkit.LSTM(2, 4, chrono=wrong)
    with pytest.raises(ValueError, match="bias=True"):
        rnnkit.LSTM(2, 4, bias=False, chrono=10)
    for cell in ("rnn", "tcn"):
        with pytest.raises(ValueError, match="chrono"):
            RecurrentConfig(cell=cell, chrono=10)
    with pytest.raises(ValueError, match="forget_bias and chrono"):
        LMConfig(cell="lstm", forget_bias=1.0, chrono=10)


@pytest.mark.parametrize("cell", ["lstm", "gru", "mingru", "minlstm"])
def test_the_configs_hand_chrono_to_the_layer(cell: str) -> None:
    layer = build_recurrent(RecurrentConfig(cell=cell, layers=1, hidden=8, chrono=T_MAX), 2)
    assert layer.chrono == T_MAX
    model = LanguageModel(LMConfig(vocab_size=10, cell=cell, layers=1, hidden=8, embedding=0,
                                   chrono=T_MAX))
    assert model.rnn.chrono == T_MAX
    assert model.rnn.bias_ih_l0.abs().max() > 1.0  # log u up to log 599 ≈ 6.4, not ±1/√8
    assert build_recurrent(RecurrentConfig(cell=cell, layers=1, hidden=8), 2).chrono is None
    assert math.isclose(RecurrentConfig.from_dict({"cell": cell, "chrono": 600}).chrono, 600)
