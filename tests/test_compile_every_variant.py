"""Issue 15 in the fast suite: every variant under ``torch.compile(fullgraph=True)`` and
``torch.export``, at the cost of one compile / one export for all of them.

One module holds every fused variant (Elman tanh/relu/sigmoid, LSTM, peephole, coupled,
peephole+coupled, GRU after/before) and the layer-normalised ones, each twice — a padded call
(``rnnkit_fused::layer_forward``) and a call with an unsorted lengths tensor
(``layer_forward_lengths``) — 2 layers, bidirectional. Compiled once, its outputs, final states
and every gradient must equal eager's; a difference is reported by variant and tensor. The
per-variant tests (one compile each, inductor too) are in test_fused_ops.py under ``-m slow``.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

import rnnkit
from conftest import LAYER_VARIANTS
from rnnkit.cells import CellSpec
from rnnkit.engine import fused

pytestmark = pytest.mark.skipif(
    fused.unavailable_reason(CellSpec("gru"), torch.float32, "cpu") is not None,
    reason="fused backend unavailable")

# the layer-normalised forms (rnnkit_ln operators) beside the fused variants
LAYER_NORM_VARIANTS = {
    "ln_lstm": (rnnkit.LSTM, {"layer_norm": True}),
    "ln_lstm_peephole": (rnnkit.LSTM, {"layer_norm": True, "peephole": True}),
    "ln_lstm_peephole_coupled": (rnnkit.LSTM, {"layer_norm": True, "peephole": True,
                                               "coupled": True}),
    "ln_gru_after": (rnnkit.GRU, {"layer_norm": True}),
    "ln_gru_before": (rnnkit.GRU, {"layer_norm": True, "reset": "before"}),
}
EVERY_VARIANT = {**LAYER_VARIANTS, **LAYER_NORM_VARIANTS}
LENGTHS = torch.tensor([4, 6, 1, 6])  # unsorted, full-length rows, one of length 1


class EveryVariant(nn.Module):
    """Every variant, 2 bidirectional layers, each once padded and once with ``lengths``;
    ``forward`` returns {"<variant> padded|lengths: output|h_n|c_n": tensor}."""

    def __init__(self, variants: dict[str, tuple[type, dict]],
                 skip: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        for name, (cls, options) in variants.items():
            for call in ("padded", "lengths"):
                if f"{name} {call}" in skip:
                    continue
                self.layers[f"{name}__{call}"] = cls(3, 8, num_layers=2, bidirectional=True,
                                                     **options)

    def forward(self, x: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        results = {}
        for key, layer in self.layers.items():
            name, call = key.split("__")
            output, state = layer(x, lengths=lengths if call == "lengths" else None)
            states = state if isinstance(state, tuple) else (state,)
            for tensor, value in zip(("output", "h_n", "c_n"), (output, *states)):
                results[f"{name} {call}: {tensor}"] = value
        return results


def _results_and_grads(module: nn.Module, x: Tensor, lengths: Tensor) -> dict[str, Tensor]:
    """Every output and final state, and the gradient of one loss over all of them with respect
    to x and every parameter (named by variant and call)."""
    results = module(x, lengths)
    loss = sum(v.pow(2).sum() if k.endswith("output") else v.sin().sum() for k, v in results.items())
    named = [(key.replace("__", " ", 1).replace(".", " ", 1), p)
             for key, p in module.get_submodule("layers").named_parameters()]
    grads = torch.autograd.grad(loss, [x, *(p for _, p in named)])
    results["d loss / d x"] = grads[0]
    results.update({f"{key}: grad": g for (key, _), g in zip(named, grads[1:])})
    return results


def _assert_same(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float, atol: float,
                 what: str) -> None:
    assert list(got) == list(want)
    differing = []
    for key, w in want.items():
        g = got[key]
        if g.shape != w.shape or not torch.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
            gap = (g - w).abs().max().item() if g.shape == w.shape else f"{g.shape} != {w.shape}"
            differing.append(f"{key}: max |{what} - eager| = {gap}")
    assert not differing, f"{what} differs from eager:\n" + "\n".join(differing)


def _compiled_equals_eager(variants: dict[str, tuple[type, dict]], backend: str,
                           rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.manual_seed(0)
    module = EveryVariant(variants)
    x = torch.randn(6, 4, 3, requires_grad=True)
    want = _results_and_grads(module, x, LENGTHS)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    got = _results_and_grads(compiled, x, LENGTHS)
    _assert_same(got, want, rtol, atol, f"torch.compile(backend={backend!r})")


def test_compile_fullgraph_every_variant_equals_eager():
    """All variants, padded and with lengths, in ONE fullgraph compile (AOT autograd's tracing,
    as inductor's, with eager kernels in place of inductor's codegen)."""
    _compiled_equals_eager(EVERY_VARIANT, "aot_eager")


def test_compile_fullgraph_inductor_representative_pair():
    """inductor itself (its codegen around the operators), on one LSTM and one GRU form; every
    variant under inductor: test_fused_ops.py, -m slow."""
    pair = {name: EVERY_VARIANT[name] for name in ("lstm_peephole_coupled", "gru_before")}
    _compiled_equals_eager(pair, "inductor")


def test_export_every_variant_round_trip():
    """torch.export of every variant at once (eval, padded and lengths), batch and time dynamic,
    saved and loaded, equal to eager at other batch and time sizes."""
    torch.manual_seed(0)
    module = EveryVariant(EVERY_VARIANT, skip=("lstm padded",)).eval()  # (below)
    x = torch.randn(6, 4, 3)
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
    program = torch.export.export(module, (x, LENGTHS),
                                  dynamic_shapes=({0: steps, 1: batch}, {0: batch}))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    fused_ops, ln_ops = torch.ops.rnnkit_fused, torch.ops.rnnkit_ln
    # one operator per layer and direction: 2 layers x 2 directions per layer
    assert targets.count(fused_ops.layer_forward.default) == 4 * (len(LAYER_VARIANTS) - 1)
    assert targets.count(fused_ops.layer_forward_lengths.default) == 4 * len(LAYER_VARIANTS)
    assert targets.count(ln_ops.layer_forward.default) == 4 * len(LAYER_NORM_VARIANTS)
    assert targets.count(ln_ops.layer_forward_lengths.default) == 4 * len(LAYER_NORM_VARIANTS)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for steps_, lengths in ((6, LENGTHS), (9, torch.tensor([2, 9, 5]))):
        x2 = torch.randn(steps_, len(lengths), 3)
        with torch.no_grad():
            want = module(x2, lengths)
        _assert_same(loaded(x2, lengths), want, 1.3e-6, 1e-5, "torch.export (loaded)")


def test_export_plain_lstm_with_dynamic_shapes():
    """The one variant the round trip above leaves out: the padded plain LSTM with batch and
    time dynamic (static shapes export: test_fused_ops.py::test_export_plain_lstm_torch_op).
    Its route (rnnkit's kernel or torch's op) was looked up by the sizes, which export makes
    SymInts: 'unhashable type: non-nested SymInt'; symbolic sizes take rnnkit's kernel."""
    module = rnnkit.LSTM(3, 8, num_layers=2, bidirectional=True).eval()
    x = torch.randn(6, 4, 3)
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: steps, 1: batch},))
    x2 = torch.randn(9, 3, 3)
    torch.testing.assert_close(program.module()(x2)[0], module(x2)[0])
