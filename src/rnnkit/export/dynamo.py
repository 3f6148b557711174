"""torch's own ONNX exporter, ``torch.onnx.export(model, args, dynamo=True)``, on a module holding
rnnkit's fused layers: each ``rnnkit_fused::layer_forward`` (one layer and direction; the
reverse direction is reversed around it by ordinary ops) becomes one forward ONNX ``LSTM`` /
``GRU`` / ``RNN`` node. Measured with torch 2.13: every fused variant, 1 or 2 layers, uni- or
bidirectional, exports and equals rnnkit under onnxruntime, at the example's shapes or with
batch and time dynamic (``dynamic_shapes=``). ``lengths=`` does not: the layer's stable sort of
its rows has no translation in torch's exporter, so ``rnnkit::checked_lengths`` raises
ExportError naming :func:`rnnkit.export_onnx`, which writes it.

How: torch's exporter builds its table of ONNX translations (``ONNXRegistry.from_torchlib``,
at the start of every export) from onnxscript's torchlib registry, keeping only the operators
torch knows by then. When rnnkit is imported, :func:`translate_for_torch_onnx` arranges for the
translations to be added to that registry — at once if it is loaded, else right after it is
first imported (which torch's exporter does before reading it), loading the fused extension
then so that its operators are known — so that using rnnkit never imports onnxscript (~1.5 s).

The weights are rearranged into ONNX's layout and gate order by Gather/Concat nodes in the
graph, following the same table as :func:`rnnkit.export.onnx_weights` (``ONNX_FORMS``).
What has no such node — lengths, a packed sequence, a layer in training with recurrent dropout
or zoneout masks, bf16 — raises :class:`ExportError` naming :func:`rnnkit.export_onnx` (inside
torch's ConversionError, whose summary quotes it, and whose ``__cause__`` chain holds it). It
cannot come first: torch 2.13's exporter (``torch/onnx/_internal/exporter/_core.py``) runs the
model's forward only inside its capture strategies and the translations only inside its
decomposition and translation steps, each of which catches every ``Exception`` and raises its
own TorchExportError / ConversionError, first line its fixed "step n/3" text (``raise ... from
e``); no rnnkit code runs before. Only a ``BaseException`` outside ``Exception`` would pass,
which callers' ``except Exception`` would not catch either.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

_registered = False
REGISTRY_MODULE = "onnxscript.function_libs.torch_lib.registration"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds REGISTRY_MODULE the usual way, and registers the translations once it has run."""

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # (one shot; and find_spec below must not find this finder)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_then_register(module: ModuleType) -> None:
            run(module)
            try:
                register_translations()
            except Exception as exc:  # (never break onnxscript's import for the whole process)
                warnings.warn(f"rnnkit: torch.onnx.export(dynamo=True) will not translate "
                              f"rnnkit's operators: {type(exc).__name__}: {exc}", stacklevel=2)

        spec.loader.exec_module = run_then_register  # type: ignore[method-assign]
        return spec


def translate_for_torch_onnx() -> None:
    """Makes the translations reach torch.onnx.export(dynamo=True): now if onnxscript's torchlib
    registry is loaded, else when it is."""
    if REGISTRY_MODULE in sys.modules:
        register_translations()
    elif importlib.util.find_spec("onnxscript") is not None and not any(
            isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())

USE_EXPORT_ONNX = "use rnnkit.export_onnx(model, args, path), which writes every rnnkit layer"


def register_translations() -> None:
    """Adds the translations to onnxscript's torchlib registry (once; a no-op without
    onnxscript, where torch's exporter cannot run either)."""
    global _registered
    if _registered:
        return
    try:
        from onnxscript.function_libs.torch_lib.registration import torch_op
        from onnxscript.onnx_opset import opset18 as op
    except ImportError:
        return
    from rnnkit.engine.fused import _build
    from rnnkit.engine.fused._function import KERNELS, Config
    from rnnkit.export.onnx import ONNX_FORMS, PEEPHOLE_ORDER, ZERO, ExportError

    _build.load()  # (torch's exporter keeps a translation only for an operator it knows)

    spec_of = {config: spec for spec, config in KERNELS.items()}

    def rows(weight: Any, order: tuple[int, ...], hidden: int) -> Any:
        """``weight``'s (G*H, ...) gate blocks in ONNX's order, zeros for a ZERO block."""
        parts = []
        for block in order:
            if block == ZERO:
                shape = [hidden, *[int(d) for d in weight.shape[1:]]]
                parts.append(op.ConstantOfShape(op.Constant(value_ints=shape)))
            else:
                index = op.Constant(value_ints=list(range(block * hidden, (block + 1) * hidden)))
                parts.append(op.Gather(weight, index, axis=0))
        return op.Concat(*parts, axis=0)

    def node(cfg: Config, x: Any, h0: Any, c0: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any,
             peephole_weights: Any, masks: tuple[Any, ...], bf16: bool) -> tuple[Any, ...]:
        if any(mask is not None for mask in masks):
            raise ExportError("torch.onnx.export: an rnnkit layer in training mode with recurrent "
                              "dropout or zoneout has no ONNX node; call model.eval(), or "
                              + USE_EXPORT_ONNX)
        if bf16:
            raise ExportError("torch.onnx.export: rnnkit's bf16 kernels have no ONNX node; "
                              + USE_EXPORT_ONNX)
        spec = spec_of[cfg]
        operator, order, attributes = ONNX_FORMS[spec]
        hidden = int(w_hh.shape[1])
        zero_axis = op.Constant(value_ints=[0])
        W = op.Unsqueeze(rows(w_ih, order, hidden), zero_axis)
        R = op.Unsqueeze(rows(w_hh, order, hidden), zero_axis)
        B = None
        if b_ih is not None:
            B = op.Unsqueeze(op.Concat(rows(b_ih, order, hidden), rows(b_hh, order, hidden),
                                       axis=0), zero_axis)
        h = op.Unsqueeze(h0, zero_axis)
        if operator == "LSTM":
            P = None
            if peephole_weights is not None:  # rows in the cell's diagonal_names order
                from rnnkit.cells import math_for

                names = math_for(spec).diagonal_names
                P = op.Unsqueeze(op.Concat(*[
                    op.Gather(peephole_weights, op.Constant(value_int=names.index(name)), axis=0)
                    if name in names else op.ConstantOfShape(op.Constant(value_ints=[hidden]))
                    for name in PEEPHOLE_ORDER], axis=0), zero_axis)
            Y, Y_h, Y_c = op.LSTM(x, W, R, B, None, h, op.Unsqueeze(c0, zero_axis), P,
                                  hidden_size=hidden, direction="forward", **attributes)
            c_n = op.Squeeze(Y_c, zero_axis)
        else:
            if operator == "GRU":
                Y, Y_h = op.GRU(x, W, R, B, None, h, hidden_size=hidden,
                                direction="forward", **attributes)
            else:
                affine = ({"activation_alpha": [1.0], "activation_beta": [0.0]}
                          if attributes["activation"] == "Affine" else {})
                Y, Y_h = op.RNN(x, W, R, B, None, h, hidden_size=hidden,
                                direction="forward", activations=[attributes["activation"]],
                                **affine)
            c_n = None
        y, h_n = op.Squeeze(Y, op.Constant(value_ints=[1])), op.Squeeze(Y_h, zero_axis)
        # (c_n of a GRU/RNN and the saved activations are empty tensors in the schema: nothing in
        # an inference graph reads them)
        empty = op.ConstantOfShape(op.Constant(value_ints=[0]))
        return y, h_n, empty if c_n is None else c_n, empty, empty, empty

    @torch_op("rnnkit_fused::layer_forward", trace_only=True)
    def layer_forward(kind: int, act: int, peephole: bool, coupled: bool, reset_before: bool,
                      x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole_weights, recurrent_mask,
                      zoneout_h, zoneout_c, batch_sizes: list[int], training: bool,
                      threads: int, bf16: bool = False):
        if batch_sizes:
            raise ExportError("torch.onnx.export: a PackedSequence through an rnnkit layer has "
                              "no ONNX node; pass the padded input and lengths= as a tensor, or "
                              + USE_EXPORT_ONNX)
        return node(Config(kind, act, peephole, coupled, reset_before), x, h0, c0, w_ih, w_hh,
                    b_ih, b_hh, peephole_weights, (recurrent_mask, zoneout_h, zoneout_c), bf16)

    @torch_op("rnnkit::checked_lengths", trace_only=True)
    def checked_lengths(lengths, max_length: int):
        # (the layer sorts its rows by length with a stable sort next, which torch's exporter
        # has no ONNX translation for: torch 2.13)
        raise ExportError("torch.onnx.export(dynamo=True) cannot write an rnnkit layer called "
                          "with lengths=; " + USE_EXPORT_ONNX + " with lengths as ONNX's "
                          "sequence_lens")

    _registered = True


__all__ = ["register_translations", "translate_for_torch_onnx"]
