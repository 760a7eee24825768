"""Deployment: ONNX export (fp32/fp16/int8 Q/DQ, verified on onnxruntime) and TensorRT engines.

``onnx``, ``onnxruntime``, ``onnxslim``, ``onnxconverter_common``, ``tensorrt`` and ``tensorrt_rtx`` are imported
only inside the functions that use them, so this package imports with torch and numpy alone.
"""

from .calibration import calibration_images
from .int8 import CalibrationSource, Int8Floors, Int8Report, export_int8, quantize_int8, verify_int8
from .metrics import check_metrics, output_metrics
from .onnx import (
    PLAIN_OPS,
    ExportError,
    export_onnx,
    model_io,
    onnx_session,
    op_counts,
    run_onnx,
    save_onnx,
    simplify,
    verify_onnx,
)
from .precision import PRECISIONS, PrecisionError, onnx_precision, to_fp16
from .qdq import check_tensorrt_qdq

__all__ = [
    "PLAIN_OPS", "ExportError", "export_onnx", "model_io", "onnx_session", "op_counts", "run_onnx", "save_onnx",
    "simplify", "verify_onnx", "PRECISIONS", "PrecisionError", "calibration_images", "check_metrics",
    "onnx_precision", "output_metrics", "quantize_int8", "to_fp16", "CalibrationSource", "Int8Floors", "Int8Report",
    "export_int8", "verify_int8", "check_tensorrt_qdq",
]
