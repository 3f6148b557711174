"""Shipping trained models: ONNX export with ONNX's own recurrent operators."""

from rnnkit.export.onnx import ExportError, export_onnx

__all__ = ["ExportError", "export_onnx"]
