"""The plain LSTM where it trains on rnnkit's kernel instead of torch's oneDNN op (1 thread,
T >= 100, B >= 32, H >= 256: ``fused.own_kernel_faster``): the same outputs, final states and
gradients as ``torch.nn.LSTM``, stacked, bidirectional and with lengths. Not timing tests.

float32 sums over T·B = 3200 rows round differently in every GEMM, so the reference is
``torch.nn.LSTM`` in float64, and rnnkit's float32 error must stay within a small multiple of
torch's own float32 error against it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import rnnkit
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused

pytestmark = pytest.mark.skipif(
    fused.unavailable_reason(CellSpec("lstm"), torch.float32, "cpu") is not None
    or fused._build.load() is None,
    reason="fused backend unavailable",
)

STEPS, BATCH, INPUTS, HIDDEN = 100, 32, 16, 256

# the shapes and routes here are the built-in rules' (measured on AVX-512), not this CPU's table
pytestmark = [pytestmark, pytest.mark.usefixtures("builtin_routes")]


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_routes_to_rnnkits_kernel_only_where_measured_faster(one_thread) -> None:
    assert fused.own_kernel_faster(100, 32, 256, threads=1)
    assert fused.own_kernel_faster(200, 64, 512, threads=1)
    assert not fused.own_kernel_faster(100, 32, 256, threads=1, inference=True)  # its forward
    assert not fused.own_kernel_faster(64, 32, 256, threads=1)
    assert not fused.own_kernel_faster(100, 16, 256, threads=1)
    assert not fused.own_kernel_faster(100, 32, 128, threads=1)
    assert not fused.own_kernel_faster(35, 20, 200, threads=1)
    # with 2 threads the same training rule (measured on both cores, quiet)
    assert fused.own_kernel_faster(100, 32, 256, threads=2)
    assert not fused.own_kernel_faster(100, 32, 256, threads=2, inference=True)
    assert not fused.own_kernel_faster(64, 32, 256, threads=2)
    assert not fused.own_kernel_faster(35, 20, 200, threads=2)
    spec = CellSpec("lstm")
    x = torch.zeros(STEPS, BATCH, HIDDEN)
    assert fused.native_op(spec, x, HIDDEN) is None
    with torch.no_grad():
        assert fused.native_op(spec, x, HIDDEN) is not None
    assert fused.native_op(spec, x[:64], HIDDEN) is not None


def _run(module: torch.nn.Module, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor],
         lengths: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Output, final h and c, and the gradients of x, hx and every parameter."""
    x = x.detach().requires_grad_()
    hx = tuple(s.detach().requires_grad_() for s in hx)
    if lengths is None:
        out, (h, c) = module(x, hx)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out_p, (h, c) = module(packed, hx)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, total_length=x.shape[0])
    # weights that differ per element, so a wrong gradient row cannot cancel out
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = (out * weight).sum() + (h * h).sum() + c.sum()
    grads = torch.autograd.grad(loss, [x, *hx, *module.parameters()])
    return (out, h, c, *grads)


@pytest.mark.parametrize("lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, True)],
                         ids=["one", "stacked-bidirectional"])
def test_plain_lstm_on_rnnkits_kernel_matches_torch_nn(one_thread, monkeypatch, layers,
                                                       bidirectional, lengths) -> None:
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(INPUTS, HIDDEN, num_layers=layers, bidirectional=bidirectional)
    ours = rnnkit.LSTM.from_torch(theirs)
    x = torch.randn(STEPS, BATCH, INPUTS)
    shape = (layers * (2 if bidirectional else 1), BATCH, HIDDEN)
    hx = (0.5 * torch.randn(shape), 0.5 * torch.randn(shape))
    lens = None
    if lengths:
        lens = torch.randint(STEPS // 2, STEPS + 1, (BATCH,))
        lens[0] = STEPS
    # every layer must run rnnkit's kernel: torch's op would fail here
    def no_torch_op(*args, **kwargs):
        raise AssertionError("the plain LSTM went to torch's op")

    assert fused.native_op(ours.math, x, HIDDEN) is None  # (a stack torch runs whole: none)
    monkeypatch.setattr(fused, "_run_vf_lstm", no_torch_op)
    got = _run(ours, x, hx, lens)
    monkeypatch.undo()
    want = _run(theirs, x, hx, lens)
    exact = _run(theirs.double(), x.double(), tuple(s.double() for s in hx), lens)
    names = ["output", "h", "c", "dx", "dh0", "dc0", *(n for n, _ in theirs.named_parameters())]
    for name, g, w, e in zip(names, got, want, exact):
        assert g.shape == w.shape, name
        e = e.float()
        torch_error = (w - e).abs().max().item()
        our_error = (g - e).abs().max().item()
        scale = e.abs().max().item()
        assert our_error <= 4 * torch_error + 1e-6 * scale + 1e-7, (name, our_error, torch_error)
