"""The Elman RNN with ``nonlinearity="identity"`` (the linear RNN): torch.nn has no such cell, so
its forward is checked against onnxruntime's RNN operator with the activation Affine(α = 1,
β = 0), an independent implementation; its gradients by gradcheck in float64 through every
engine (the fused kernels' hand-derived backward included); NaN/inf pass straight through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rnnkit
from rnnkit.models.language_model import LMConfig
from rnnkit.options import OptionError

BACKENDS = ("reference", "bptt", "fused")


def _onnxruntime_linear_rnn(x: torch.Tensor, h0: torch.Tensor, layer: rnnkit.RNN) -> np.ndarray:
    """ONNX RNN (one layer, forward) with activations=["Affine"], α = 1, β = 0: h_t = W x_t +
    R h_{t-1} + Wb + Rb. Returns Y (T, 1, B, H)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    hidden = layer.hidden_size
    weights = {"W": layer.weight_ih_l0, "R": layer.weight_hh_l0,
               "B": torch.cat([layer.bias_ih_l0, layer.bias_hh_l0])}
    initialisers = [helper.make_tensor(name, TensorProto.FLOAT, (1, *w.shape),
                                       w.detach().numpy().ravel().tolist())
                    for name, w in weights.items()]
    node = helper.make_node("RNN", ["X", "W", "R", "B", "", "initial_h"], ["Y"],
                            hidden_size=hidden, activations=["Affine"], activation_alpha=[1.0],
                            activation_beta=[0.0])
    graph = helper.make_graph(
        [node], "linear_rnn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape)),
         helper.make_tensor_value_info("initial_h", TensorProto.FLOAT, [1, *h0.shape])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [x.shape[0], 1, x.shape[1], hidden])],
        initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x.numpy(), "initial_h": h0.unsqueeze(0).numpy()})[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_equals_onnxruntime_affine_rnn(backend: str) -> None:
    torch.manual_seed(0)
    layer = rnnkit.RNN(4, 6, nonlinearity="identity", backend=backend)
    x, h0 = torch.randn(9, 3, 4), torch.randn(3, 6)
    output, h_n = layer(x, h0.unsqueeze(0))
    expected = torch.from_numpy(_onnxruntime_linear_rnn(x, h0, layer))[:, 0]  # (T, B, H)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_n[0], expected[-1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the lean inference path too
        torch.testing.assert_close(layer(x, h0.unsqueeze(0))[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend: str) -> None:
    torch.manual_seed(1)
    layer = rnnkit.RNN(3, 4, num_layers=2, bidirectional=True, nonlinearity="identity",
                       backend=backend, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def output(x: torch.Tensor, h0: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        out, h_n = torch.func.functional_call(layer, dict(zip(names, weights)), (x, h0))
        return torch.cat([out.flatten(), h_n.flatten()])

    weights = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(output, (x, h0, *weights))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_as_in_the_plain_torch_loop(backend: str) -> None:
    """f(a) = a: a NaN or inf reaches outputs and gradients exactly as the affine steps written
    in plain torch carry it (0 · NaN = NaN in the recurrent product, as in any matmul)."""
    torch.manual_seed(2)
    layer = rnnkit.RNN(2, 3, nonlinearity="identity", backend=backend)
    x = torch.randn(4, 2, 2)
    x[1, 0, 0], x[2, 1, 1] = float("nan"), float("inf")
    x.requires_grad_()
    output, _ = layer(x)
    grad = torch.randn_like(output)
    (output * grad).nan_to_num().sum().backward()

    leaves = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    w_ih, w_hh, b_ih, b_hh = leaves
    x_plain = x.detach().clone().requires_grad_()
    h, steps = torch.zeros(2, 3), []
    for x_t in x_plain:
        h = x_t @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        steps.append(h)
    expected = torch.stack(steps)
    (expected * grad).nan_to_num().sum().backward()
    torch.testing.assert_close(output, expected, equal_nan=True)
    assert torch.isnan(output).any() and torch.isinf(output).any()
    torch.testing.assert_close(x.grad, x_plain.grad, equal_nan=True)
    for parameter, leaf in zip(layer.parameters(), leaves):
        torch.testing.assert_close(parameter.grad, leaf.grad, equal_nan=True)


def test_option_names_it_and_torch_nn_conversion_refuses_it() -> None:
    assert LMConfig(vocab_size=10, cell="rnn", nonlinearity="identity").nonlinearity == "identity"
    with pytest.raises(OptionError, match=r"tanh, relu, sigmoid, identity"):
        LMConfig.from_dict({"cell": "rnn", "nonlinearity": "linear"})
    with pytest.raises(ValueError, match=r"torch.nn.RNN has no identity nonlinearity"):
        rnnkit.RNN(2, 3, nonlinearity="identity").to_torch()
