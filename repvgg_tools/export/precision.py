"""Precision lives in the ONNX file: fp16 conversion, INT8 explicit Q/DQ quantization, calibration data, metrics.

TensorRT 11 and TensorRT-RTX build strongly typed networks, so the precision of an engine is the precision of the
ONNX it comes from. Every file written here runs on onnxruntime's CPU provider, so every precision is verified
without a GPU (see :func:`output_metrics` and :func:`check_metrics`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import FP16_MIN_COSINE, FP16_MIN_TOP1, ONNX_FP32_RTOL, max_errors

__all__ = [
    "PRECISIONS", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "PrecisionError", "to_fp16", "quantize_int8",
    "calibration_images", "digits_images", "folder_images", "output_metrics", "check_metrics", "onnx_precision",
    "max_activation", "image_files", "load_images",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 50_000_000  # declared width x height above this is refused before decoding (real photos: < 50 MP)

FP16_MAX = 65504.0


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


def quantize_int8(model: Any, images: np.ndarray, *, batch_size: int = 8, per_channel: bool = True,
                  method: str = "minmax", reduce_range: bool = False) -> Any:
    """INT8 explicit-quantization (Q/DQ) copy of an fp32 ``onnx.ModelProto``, calibrated on ``images``.

    Static post-training quantization following TensorRT's explicit-quantization rules (see
    :mod:`repvgg_tools.export.qdq`): Q/DQ only at Conv/Gemm inputs, symmetric int8 activations per tensor,
    symmetric int8 weights per output channel, float biases, no Q/DQ on outputs. The result runs on onnxruntime CPU
    and parses in TensorRT(-RTX). :func:`repvgg_tools.export.int8.export_int8` adds the held-out accuracy check.

    Args:
        model: fp32 model with one input.
        images: calibration batch ``(N, C, H, W)`` float32, preprocessed like the model's inputs.
        batch_size: calibration batch size (a fixed-batch model uses its own, dropping the remainder).
        per_channel: per-output-channel weight scales.
        method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (see :mod:`repvgg_tools.export.qdq`).
        reduce_range: 7-bit weights, for int8 CPU kernels that saturate with full-range weights on x86 without
            VNNI (AVX2, AVX-512F), such as onnxruntime's QLinearConv; not for TensorRT.

    Raises:
        PrecisionError: no images, or an unknown method.
    """
    from .qdq import CALIBRATION_METHODS, calibrate_thresholds, insert_qdq

    if method not in CALIBRATION_METHODS:
        raise PrecisionError(f"unknown calibration method {method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
    if len(images) == 0:
        raise PrecisionError("no calibration images")
    fixed = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    if fixed > 0:  # a fixed-batch model takes whole batches only
        if len(images) < fixed:
            raise PrecisionError(f"the model has a fixed batch of {fixed}, but only {len(images)} calibration images")
        batch_size, images = fixed, images[: len(images) - len(images) % fixed]
    batches = [np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)
               for i in range(0, len(images), batch_size)]
    thresholds = calibrate_thresholds(model, batches, method)
    result = insert_qdq(model, thresholds, per_channel=per_channel, reduce_range=reduce_range)
    log.info("quantized to int8 Q/DQ with %d calibration images (%s)", len(images), method)
    return result


def digits_images(split: str, input_size: int, channels: int = 3, samples: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` from the built-in digits set, upsampled to ``input_size`` (see ``digits_dataset``)."""
    from ..data import digits_dataset

    images, labels = digits_dataset(split, image_size=input_size, channels=channels).tensors
    if samples is not None:
        images, labels = images[:samples], labels[:samples]
    return images.numpy(), labels.numpy()


def image_files(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root`` (any depth, e.g. an ImageFolder tree), in sorted path order.

    Raises:
        PrecisionError: not a directory, or no images in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise PrecisionError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise PrecisionError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def load_images(files: Sequence[str | os.PathLike], input_size: int, channels: int = 3) -> np.ndarray:
    """Images preprocessed like ImageNet evaluation, ``(len(files), channels, input_size, input_size)`` float32.

    Each image is resized (shorter side to ``input_size / 0.875``), centre-cropped to ``input_size`` and normalized
    with the ImageNet mean/std (their channel averages for 1 channel).

    Raises:
        PrecisionError: an unreadable image, or a model with other than 1 or 3 channels.
    """
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import v2

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    elif channels != 3:
        raise PrecisionError(f"calibration images need a 1- or 3-channel model, not {channels} channels")
    transform = v2.Compose([
        v2.ToImage(), v2.Resize(round(input_size / 0.875), antialias=True), v2.CenterCrop(input_size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])
    out = np.empty((len(files), channels, input_size, input_size), dtype=np.float32)
    for i, path in enumerate(files):
        try:
            with warnings.catch_warnings():  # PIL's DecompressionBombWarning: the size check below says it in one line
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    width, height = img.size  # from the header: nothing is decoded yet
                    if width * height > MAX_IMAGE_PIXELS:
                        raise PrecisionError(f"{path}: declares {width}x{height} pixels, more than "
                                             f"{MAX_IMAGE_PIXELS // 10**6} megapixels; not decoded (damaged or "
                                             "hostile file?)")
                    img = img.convert("RGB" if channels == 3 else "L")
                    out[i] = transform(img).numpy()
        except PrecisionError:
            raise
        except Image.DecompressionBombError:
            raise PrecisionError(f"{path}: declares more than {MAX_IMAGE_PIXELS // 10**6} megapixels; not decoded "
                                 "(damaged or hostile file?)") from None
        except UnidentifiedImageError:
            raise PrecisionError(f"{path}: not a readable image (unknown format)") from None
        except Exception as exc:  # noqa: BLE001 - a damaged file raises OSError, SyntaxError, struct.error, ...
            raise PrecisionError(f"{path}: not a readable image ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]})") from None
    return out


def folder_images(root: str | os.PathLike, input_size: int, samples: int | None = None, channels: int = 3
                  ) -> np.ndarray:
    """The first ``samples`` images under ``root`` in sorted path order (:func:`image_files`), preprocessed by
    :func:`load_images`.

    Raises:
        PrecisionError: not a directory, no images in it, or an unreadable image.
    """
    files = image_files(root)
    return load_images(files[:samples] if samples is not None else files, input_size, channels)


def calibration_images(source: str, input_size: int, samples: int, channels: int = 3) -> np.ndarray:
    """Calibration batch: ``"digits"`` (training split of the built-in set) or an image directory path."""
    if samples < 1:
        raise PrecisionError(f"--calib-samples must be at least 1, not {samples}")
    if source == "digits":
        if channels not in (1, 3):
            raise PrecisionError(f"the digits set needs a 1- or 3-channel model, not {channels} channels")
        return digits_images("train", input_size, channels, samples)[0]
    return folder_images(source, input_size, samples, channels)


def output_metrics(candidate: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict:
    """Agreement of a model's outputs with reference outputs (lists of arrays, same shapes, first axis = batch).

    Returns:
        ``max_abs``, ``max_rel`` (``max|a-b| / max|b|`` over all outputs), ``cosine`` (the lowest per-sample cosine
        similarity of all outputs concatenated), ``top1_agreement`` (share of samples with the same argmax, for a
        single 2-D output; else None), ``finite`` and ``samples``.
    """
    if len(candidate) != len(reference):
        raise ValueError(f"outputs differ in count: {len(candidate)} vs {len(reference)}")
    for c, r in zip(candidate, reference, strict=True):
        if c.shape != r.shape:
            raise ValueError(f"output shapes differ: {tuple(c.shape)} vs {tuple(r.shape)}")
    cand = [np.asarray(c, dtype=np.float64) for c in candidate]
    ref = [np.asarray(r, dtype=np.float64) for r in reference]
    n = ref[0].shape[0]
    finite = all(np.isfinite(a).all() for a in cand + ref)
    result = {"samples": int(n), "finite": bool(finite), "max_abs": float("inf"), "max_rel": float("inf"),
              "cosine": float("-inf"), "top1_agreement": None}
    if len(ref) == 1 and ref[0].ndim == 2:
        result["top1_agreement"] = float((cand[0].argmax(1) == ref[0].argmax(1)).mean())
    if not finite:
        return result
    result["max_abs"], result["max_rel"] = max_errors(cand, ref)
    c_flat = np.concatenate([c.reshape(n, -1) for c in cand], axis=1)
    r_flat = np.concatenate([r.reshape(n, -1) for r in ref], axis=1)
    norms = np.linalg.norm(c_flat, axis=1) * np.linalg.norm(r_flat, axis=1)
    dots = (c_flat * r_flat).sum(1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(np.abs(c_flat).max(1) == 0, 1.0, 0.0))
    result["cosine"] = float(cos.min())
    return result


def max_activation(model: Any, inputs: Sequence[Any]) -> float:
    """Largest absolute value any leaf module of a PyTorch model outputs on ``inputs`` (fp32, no grad).

    onnxruntime's CPU provider runs many fp16 operators through fp32 kernels, so an fp16 ONNX that overflows on a GPU
    (values beyond 65504) can look fine on CPU; this bound is what tells.
    """
    import torch

    peak = [0.0]

    def hook(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel():
            peak[0] = max(peak[0], float(output.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            for x in inputs:
                model(x.float())
    finally:
        for h in handles:
            h.remove()
    return peak[0]


def check_metrics(metrics: dict, precision: str) -> tuple[bool, str]:
    """``(passed, reason)`` of the verification contract for a precision (see design.md section 5).

    fp32: ``max_rel <= ONNX_FP32_RTOL`` (1e-4); fp16: cosine >= ``FP16_MIN_COSINE`` (0.9999), the same top-1 on
    >= ``FP16_MIN_TOP1`` (99%) of samples (constants of :mod:`repvgg_tools.contract`) and, when ``metrics`` has
    ``max_activation`` (see :func:`max_activation`), no activation beyond fp16's 65504; int8: finite outputs only
    (the int8 contract, floors on held-out images, is :func:`repvgg_tools.export.int8.verify_int8`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    if not metrics["finite"]:
        return False, "outputs contain NaN or Inf"
    if precision == "fp32":
        ok = metrics["max_rel"] <= ONNX_FP32_RTOL
        return ok, f"max rel err {metrics['max_rel']:.3e} (tolerance {ONNX_FP32_RTOL:.0e})"
    top1 = metrics["top1_agreement"]
    top1_text = "" if top1 is None else f", top-1 agreement {top1:.1%}"
    if precision == "fp16":
        peak = metrics.get("max_activation")
        if peak is not None and peak > FP16_MAX:
            return False, f"activations reach {peak:.3g}, beyond fp16's range ({FP16_MAX:.0f})"
        ok = metrics["cosine"] >= FP16_MIN_COSINE and (top1 is None or top1 >= FP16_MIN_TOP1)
        return ok, (f"cosine {metrics['cosine']:.6f} (minimum {FP16_MIN_COSINE}){top1_text}, "
                    f"max rel err {metrics['max_rel']:.3e}")
    return True, f"cosine {metrics['cosine']:.4f}{top1_text}, max rel err {metrics['max_rel']:.3e}"


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
