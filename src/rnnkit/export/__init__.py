"""Shipping trained models: ONNX export with ONNX's own recurrent operators."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # (imported on first use: rnnkit.engine imports rnnkit.export.dynamo while rnnkit itself is
    # being imported, before the layers that rnnkit.export.onnx needs exist)
    if name in ("ExportError", "export_onnx"):
        from rnnkit.export import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module 'rnnkit.export' has no attribute {name!r}")


__all__ = ["ExportError", "export_onnx"]
