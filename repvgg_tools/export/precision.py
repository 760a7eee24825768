"""Precision lives in the ONNX file: the precisions, their tolerances, fp16 conversion, and reading the precision an
ONNX carries.

TensorRT 11 and TensorRT-RTX build strongly typed networks, so the precision of an engine is the precision of the
ONNX it comes from. Every file written here runs on onnxruntime's CPU provider, so every precision is verified
without a GPU (:mod:`repvgg_tools.export.metrics`). INT8 Q/DQ quantization is :mod:`repvgg_tools.export.int8`,
calibration images :mod:`repvgg_tools.export.calibration`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

__all__ = ["PRECISIONS", "PrecisionError", "to_fp16", "onnx_precision"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")

FP16_MAX = 65504.0  # the largest finite fp16 value (weights beyond it are clamped); the tolerances are in contract.py


class PrecisionError(ValueError):
    """A precision conversion or its input data cannot be used; the message says why in one line."""


def to_fp16(model: Any, keep_io_types: bool = True) -> Any:
    """fp16 copy of an fp32 ``onnx.ModelProto``: weights and activations in half precision.

    Args:
        model: fp32 model.
        keep_io_types: keep float32 inputs/outputs (a Cast at each end) so callers feed and read fp32 arrays.

    Returns:
        A new ``onnx.ModelProto``.
    """
    from onnxconverter_common import float16

    # max_finite_val: weights beyond it are clamped; use fp16's real limit instead of the library's 1e4.
    # The converter warns once per weight below 1e-7 in magnitude (set to +-1e-7): thousands of lines, no news.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=keep_io_types, max_finite_val=FP16_MAX)


def onnx_precision(model: Any) -> str:
    """Precision an ONNX model carries: ``"int8"`` (Q/DQ nodes), ``"fp16"`` (fp16 tensors) or ``"fp32"``."""
    from onnx import TensorProto

    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}:
        return "int8"
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    if any(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in values):
        return "fp16"
    if any(n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)
           for n in model.graph.node):
        return "fp16"
    return "fp32"
