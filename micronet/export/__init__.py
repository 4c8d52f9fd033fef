"""ONNX export of the integer deploy form (packed INT4 weights), verified in onnxruntime."""

from micronet.export.builder import UnsupportedModelError
from micronet.export.exporter import ExportReport, export_checkpoint, export_onnx, verify_onnx
from micronet.export.graph import build_graph
from micronet.export.verify import Latency, ParityReport

__all__ = [
    "ExportReport", "Latency", "ParityReport", "UnsupportedModelError", "build_graph",
    "export_checkpoint", "export_onnx", "verify_onnx",
]
