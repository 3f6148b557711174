"""``rnnkit.RNN(orthogonal=...)``: W_hh kept orthogonal by torch's parametrization (expRNN's
``B · exp(A − Aᵀ)``, or the Cayley map). Pinned here: the layer's output and every gradient
equal plain torch (the same map written out, torch.nn.RNN through ``functional_call``) in each
engine; W_hh stays orthogonal after optimizer steps; Henaff's initialisation; the configs accept
the option and refuse bad values in one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

import rnnkit
from rnnkit.layers import henaff_orthogonal
from rnnkit.models.language_model import LanguageModel, LMConfig
from rnnkit.models.recurrent import RecurrentConfig, build_recurrent
from rnnkit.options import OptionError

BACKENDS = ("reference", "bptt", "fused")
MAPS = ("exp", "cayley")


def _orthogonal_by_hand(base: Tensor, original: Tensor, kind: str) -> Tensor:
    """W = B · Q(S), S = L − Lᵀ with L the lower triangle of the trained tensor; Q = exp(S) or
    the Cayley map (I − S/2)⁻¹ (I + S/2)."""
    lower = original.tril()
    skew = lower - lower.T
    if kind == "exp":
        return base @ torch.matrix_exp(skew)
    identity = torch.eye(skew.shape[0], dtype=skew.dtype)
    return base @ torch.linalg.solve(identity - skew / 2, identity + skew / 2)


def _gap(weight: Tensor) -> float:
    identity = torch.eye(weight.shape[0], dtype=weight.dtype)
    return float((weight @ weight.T - identity).abs().max())


@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_output_and_gradients_equal_torch_nn_with_the_map_written_out(
        kind: str, backend: str, nonlinearity: str) -> None:
    torch.manual_seed(0)
    hidden, layers = 6, 2
    layer = rnnkit.RNN(3, hidden, num_layers=layers, bidirectional=True,
                       nonlinearity=nonlinearity, backend=backend, orthogonal=kind,
                       dtype=torch.float64)
    with torch.no_grad():  # a trained-looking A (it starts at 0: W = B)
        for name in layer.parametrizations:
            layer.parametrizations[name].original.normal_(0, 0.5)
    reference = torch.nn.RNN(3, hidden, num_layers=layers, bidirectional=True,
                             nonlinearity=nonlinearity, dtype=torch.float64)
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    h0 = torch.randn(2 * layers, 4, hidden, dtype=torch.float64)
    grad = torch.randn(7, 4, 2 * hidden, dtype=torch.float64)

    output, h_n = layer(x, h0)
    (output * grad).sum().backward()

    leaves = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    weights = {}
    for name, value in leaves.items():
        if name.startswith("parametrizations."):
            weight = name.split(".")[1]  # parametrizations.weight_hh_l0.original
            base = getattr(layer.parametrizations, weight)[0].base
            weights[weight] = _orthogonal_by_hand(base, value, kind)
        else:
            weights[name] = value
    expected, expected_h = torch.func.functional_call(reference, weights, (x, h0))
    (expected * grad).sum().backward()

    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(h_n, expected_h)
    for name, parameter in layer.named_parameters():
        torch.testing.assert_close(parameter.grad, leaves[name].grad, msg=name)
    a_grad = layer.parametrizations.weight_hh_l0.original.grad
    assert a_grad.abs().max() > 0 and torch.all(a_grad.triu(1) == 0)  # only L is trained


@pytest.mark.parametrize("kind", MAPS)
def test_gradcheck_from_the_trained_tensor_through_the_fused_engine(kind: str) -> None:
    """The whole path A → W_hh (the parametrization) → the fused kernels' hand-derived BPTT."""
    torch.manual_seed(1)
    layer = rnnkit.RNN(2, 4, backend="fused", orthogonal=kind, dtype=torch.float64)
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def output(a: Tensor, x: Tensor) -> Tensor:
        swapped = {"parametrizations.weight_hh_l0.original": a}
        return torch.func.functional_call(layer, swapped, (x,))[0]

    assert torch.autograd.gradcheck(output, (a, x))


@pytest.mark.parametrize("kind", MAPS)
def test_w_hh_stays_orthogonal_after_optimizer_steps(kind: str) -> None:
    torch.manual_seed(2)
    layer = rnnkit.RNN(3, 16, num_layers=2, orthogonal=kind)
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.1)  # large steps: A moves a lot
    before = layer.weight_hh_l1.detach().clone()
    for _ in range(20):
        output, _ = layer(torch.randn(9, 5, 3))
        optimiser.zero_grad()
        output.square().sum().backward()
        optimiser.step()
    for name in ("weight_hh_l0", "weight_hh_l1"):
        assert _gap(getattr(layer, name).detach()) < 1e-5, name
    assert (layer.weight_hh_l1.detach() - before).abs().max() > 0.1  # it did train


def test_henaff_initialisation_is_rotations_by_uniform_angles() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = henaff_orthogonal(2001, generator, torch.float64)
    assert _gap(weight) < 1e-12
    assert weight[-1, -1] == 1 and weight[:-1, -1].abs().max() == 0
    blocks = weight[:-1, :-1].reshape(1000, 2, 1000, 2).diagonal(dim1=0, dim2=2)  # (2, 2, 1000)
    assert float(weight.abs().sum()) == pytest.approx(float(blocks.abs().sum()) + 1)
    torch.testing.assert_close(blocks[0, 0], blocks[1, 1])
    torch.testing.assert_close(blocks[0, 1], -blocks[1, 0])
    angles = torch.atan2(blocks[1, 0], blocks[0, 0])
    # U[−π, π]: each tenth of the circle holds about a tenth of the angles
    counts = torch.histc(angles, bins=10, min=-math.pi, max=math.pi)
    assert counts.min() > 60 and counts.max() < 140


def test_the_layer_starts_from_henaff_rotations_and_reset_draws_new_ones() -> None:
    torch.manual_seed(3)
    layer = rnnkit.RNN(3, 8, orthogonal="exp")
    weight = layer.weight_hh_l0.detach()
    assert _gap(weight) < 1e-6
    assert torch.count_nonzero(weight) == 2 * 8  # 2 × 2 blocks only
    torch.testing.assert_close(layer.parametrizations.weight_hh_l0[0].base, weight)
    layer.reset_parameters()
    after = layer.weight_hh_l0.detach()
    assert _gap(after) < 1e-6 and torch.count_nonzero(after) == 2 * 8
    assert not torch.equal(after, weight)


def test_no_grad_forward_equals_the_training_forward() -> None:
    torch.manual_seed(4)
    layer = rnnkit.RNN(3, 8, orthogonal="cayley")
    with torch.no_grad():
        layer.parametrizations.weight_hh_l0.original.normal_()
    x = torch.randn(6, 2, 3)
    trained, _ = layer(x)
    with torch.no_grad():
        inferred, _ = layer(x)
    torch.testing.assert_close(inferred, trained)


def test_configs_build_it_and_refuse_bad_values_in_one_line() -> None:
    model = LanguageModel(LMConfig(vocab_size=10, cell="rnn", layers=1, hidden=8, embedding=0,
                                   orthogonal="exp"))
    assert model.rnn.orthogonal == "exp" and _gap(model.rnn.weight_hh_l0.detach()) < 1e-6
    layer = build_recurrent(RecurrentConfig(cell="rnn", hidden=8, orthogonal="cayley"), 3)
    assert layer.orthogonal == "cayley"
    assert build_recurrent(RecurrentConfig(cell="rnn", hidden=8), 3).orthogonal is None
    for config in (LMConfig, RecurrentConfig):
        with pytest.raises(ValueError, match=r"^orthogonal keeps the Elman RNN's square W_hh "
                                             r"orthogonal: an option of the rnn cell, not of gru$"):
            config(cell="gru", orthogonal="exp")
        with pytest.raises(OptionError, match="orthogonal must be one of exp, cayley") as error:
            config.from_dict({"cell": "rnn", "orthogonal": "svd"})
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^orthogonal must be one of exp, cayley or None, "
                                         r"got 'svd'$"):
        rnnkit.RNN(3, 8, orthogonal="svd")
    with pytest.raises(ValueError, match="W_hh is parametrized"):
        rnnkit.RNN(3, 8, orthogonal="exp").to_torch()


def test_the_copy_task_trains_it_and_the_command_line_refuses_bad_values_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rnnkit.cli import main

    small = ["--length", "5", "--valid-size", "4", "--hidden", "6", "--layers", "1",
             "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--no-progress"]
    assert main(["train", "copymemory", "--cell", "rnn", "--nonlinearity", "identity",
                 "--orthogonal", "cayley", "--out", str(tmp_path / "run"), *small]) == 0
    for options, message in (
            (["--cell", "rnn", "--orthogonal", "qr"],
             "model.orthogonal must be one of exp, cayley, or none, got 'qr' (--orthogonal)"),
            (["--cell", "lstm", "--orthogonal", "exp"],
             "orthogonal keeps the Elman RNN's square W_hh orthogonal: an option of the rnn "
             "cell, not of lstm")):
        capsys.readouterr()
        assert main(["train", "copymemory", *options, "--out", str(tmp_path / "bad"), *small]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
