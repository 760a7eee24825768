"""The int8 path as one library call: calibrate, quantize (TensorRT Q/DQ), verify on held-out images, report.

:func:`export_int8` is what ``repvgg-export --precision int8`` runs, so a Python caller gets the same checks:

1. calibrate on the calibration images of a :class:`CalibrationSource` (:mod:`repvgg_tools.export.qdq`);
2. insert TensorRT-style Q/DQ and check their placement (:func:`~repvgg_tools.export.qdq.check_tensorrt_qdq`);
3. run the Q/DQ graph *as written* (``exact_qdq``: what TensorRT builds from) on onnxruntime CPU on the source's
   *held-out* images, which never overlap the calibration images, and compare with the fp32 model; the same graph
   under onnxruntime's full optimizations is measured too and reported, never enforced (its fused int8 kernels
   saturate on x86 CPUs without VNNI; with no Q on Conv outputs it does not fuse this file into them anyway);
4. fail below the :class:`Int8Floors`.

Floors, and why (figures measured with ``tests/test_int8.py``'s tiny RepVGG trained on digits at 16x16 and a
``repvgg_a0`` trained two epochs on digits at 32x32; ``docs/deploy.md`` has the table):

- ``min_top1 = 0.95`` (top-1 agreement of int8 with fp32). Correct int8 models agree on 98.4-99.2%; calibrating
  on the wrong distribution (uniform noise in [0, 1] instead of standardized digits) gives 91.6-92.8%, a 100x
  activation or weight scale 19-93%, calibration on images 100x too dark 10-12%. 0.95 sits between, 4 standard
  errors below the correct 98.9% at the default 128 held-out images; at the 64-image minimum a correct model with
  98.9% expected agreement still fails only 0.6% of the time (4 or more disagreements).
- ``min_cosine = 0.99`` (mean over held-out images of the cosine similarity of int8 and fp32 logits). Correct:
  0.9989-0.9995; uniform-noise calibration 0.945-0.980; a 100x activation scale <= 0.95.
- ``min_feature_cosine = 0.97`` (feature exports: the same, per output map, the worst map counts). Correct A0 stage
  maps: 0.989-0.999 (deeper maps are lower, and bigger models are deeper); uniform-noise calibration 0.913-0.953.
- ``max_rel_error = 0.3`` (mean over images of ``||int8 - fp32|| / ||fp32||``, per map). Cosine and top-1 cannot
  see magnitude: a 100x scale on the classifier's weights keeps both (98.9%, 0.999) and multiplies the logits by
  100. Correct: 0.03-0.05 for logits, 0.05-0.14 for A0 feature maps; wrong calibration 0.32-0.39.

A check that passes says the int8 file computes what the fp32 model computes *on images like the calibration
source*; it cannot say that the source matches your deployment data. A synthetic source (random images, for smoke
tests) makes even that statement empty: the report says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..contract import INT8_MAX_REL_ERROR, INT8_MIN_COSINE, INT8_MIN_FEATURE_COSINE, INT8_MIN_TOP1, max_errors
from .calibration import MIN_HELD_OUT, CalibrationSource, is_digits_model
from .precision import PrecisionError

__all__ = [
    "MIN_HELD_OUT", "Int8Floors", "CalibrationSource", "Int8Report", "int8_metrics", "is_digits_model",
    "verify_int8", "qat_qdq", "export_int8",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Int8Floors:
    """Pass/fail limits of the int8 check (module docstring: values and reasoning); defaults from
    :mod:`repvgg_tools.contract`."""

    min_top1: float = INT8_MIN_TOP1
    min_cosine: float = INT8_MIN_COSINE
    min_feature_cosine: float = INT8_MIN_FEATURE_COSINE
    max_rel_error: float = INT8_MAX_REL_ERROR

    def __post_init__(self) -> None:
        if not 0 <= self.min_top1 <= 1:
            raise PrecisionError(f"the top-1 agreement floor must be in [0, 1], not {self.min_top1}")
        for name in ("min_cosine", "min_feature_cosine"):
            if not -1 <= getattr(self, name) <= 1:
                raise PrecisionError(f"the cosine floor must be in [-1, 1], not {getattr(self, name)}")
        if not self.max_rel_error >= 0:
            raise PrecisionError(f"the relative-error limit must be >= 0, not {self.max_rel_error}")


def int8_metrics(candidate: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict:
    """Agreement of int8 outputs with fp32 outputs (lists of arrays, first axis = sample).

    Returns:
        ``samples``, ``finite``, ``classifier`` (one 2-D output), ``max_rel`` (``max|a-b| / max|b|``); for a
        classifier ``top1_agreement``, ``cosine_mean``, ``cosine_min``, ``rel_error``; otherwise per output map
        ``feature_cosine`` (mean per-sample cosine) and ``feature_rel_error`` (mean ``||a-b|| / ||b||``).
    """
    if len(candidate) != len(reference):
        raise PrecisionError(f"outputs differ in count: {len(candidate)} vs {len(reference)}")
    cand = [np.asarray(c, dtype=np.float64) for c in candidate]
    ref = [np.asarray(r, dtype=np.float64) for r in reference]
    for c, r in zip(cand, ref, strict=True):
        if c.shape != r.shape:
            raise PrecisionError(f"output shapes differ: {tuple(c.shape)} vs {tuple(r.shape)}")
    n = ref[0].shape[0]
    classifier = len(ref) == 1 and ref[0].ndim == 2
    finite = all(np.isfinite(a).all() for a in cand + ref)
    result: dict[str, Any] = {"samples": int(n), "finite": bool(finite), "classifier": classifier}
    if not finite:
        return result
    result["max_rel"] = max_errors(cand, ref)[1]
    cosines, rel_errors = [], []
    for c, r in zip(cand, ref, strict=True):
        c2, r2 = c.reshape(n, -1), r.reshape(n, -1)
        nc, nr = np.linalg.norm(c2, axis=1), np.linalg.norm(r2, axis=1)
        both = (nc > 0) & (nr > 0)
        cos = np.where(both, (c2 * r2).sum(1) / np.where(both, nc * nr, 1.0), np.where((nc == 0) & (nr == 0), 1, 0))
        diff = np.linalg.norm(c2 - r2, axis=1)
        rel = np.where(nr > 0, diff / np.where(nr > 0, nr, 1.0), np.where(diff == 0, 0.0, np.inf))
        cosines.append(cos)
        rel_errors.append(rel)
    if classifier:
        result.update(top1_agreement=float((cand[0].argmax(1) == ref[0].argmax(1)).mean()),
                      cosine_mean=float(cosines[0].mean()), cosine_min=float(cosines[0].min()),
                      rel_error=float(rel_errors[0].mean()))
    else:
        result.update(feature_cosine=[float(c.mean()) for c in cosines],
                      feature_cosine_min=[float(c.min()) for c in cosines],
                      feature_rel_error=[float(r.mean()) for r in rel_errors])
    return result


def _failures(metrics: dict, floors: Int8Floors) -> list[str]:
    if not metrics["finite"]:
        return ["outputs contain NaN or Inf"]
    out = []
    if metrics["classifier"]:
        if metrics["top1_agreement"] < floors.min_top1:
            out.append(f"top-1 agreement {metrics['top1_agreement']:.1%} < {floors.min_top1:.1%}")
        if metrics["cosine_mean"] < floors.min_cosine:
            out.append(f"logit cosine {metrics['cosine_mean']:.4f} < {floors.min_cosine}")
        if metrics["rel_error"] > floors.max_rel_error:
            out.append(f"relative error {metrics['rel_error']:.3g} > {floors.max_rel_error}")
        return out
    for i, (cos, rel) in enumerate(zip(metrics["feature_cosine"], metrics["feature_rel_error"], strict=True)):
        if cos < floors.min_feature_cosine:
            out.append(f"output {i} cosine {cos:.4f} < {floors.min_feature_cosine}")
        if rel > floors.max_rel_error:
            out.append(f"output {i} relative error {rel:.3g} > {floors.max_rel_error}")
    return out


@dataclass
class Int8Report:
    """What :func:`export_int8` measured and decided; ``to_dict()`` is JSON-ready, ``summary()`` one line."""

    source: str
    method: str
    calibration_samples: int
    synthetic: bool
    floors: Int8Floors
    verified: bool = False
    held_out_samples: int = 0
    metrics: dict = field(default_factory=dict)
    accuracy: dict | None = None
    onnxruntime_optimized: dict | None = None
    placement_problems: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when verified and nothing failed (an unverified export is not a pass)."""
        return self.verified and not self.failures

    def summary(self) -> str:
        """One line: the enforced figures and, when it failed, why."""
        m = self.metrics
        if not self.verified:
            return "not verified"
        if not m.get("finite", False):
            text = "outputs contain NaN or Inf"
        elif m["classifier"]:
            text = (f"top-1 agreement {m['top1_agreement']:.1%}, logit cosine {m['cosine_mean']:.4f}, "
                    f"relative error {m['rel_error']:.3g}")
        else:
            text = (f"per-map cosine {', '.join(f'{c:.4f}' for c in m['feature_cosine'])}, relative error "
                    f"{', '.join(f'{r:.3g}' for r in m['feature_rel_error'])}")
        if self.synthetic:
            text += " (synthetic calibration: a smoke test, says nothing about accuracy)"
        return text + (f"; below the floors: {'; '.join(self.failures)}" if self.failures else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(passed=self.passed, summary=self.summary())
        return d


def _batches(images: np.ndarray, fixed: int, size: int = 16) -> list[np.ndarray]:
    """Batches of ``size`` (a fixed-batch model: of its batch, dropping the remainder)."""
    if fixed > 0:
        images = images[: len(images) - len(images) % fixed]
        size = fixed
    return [images[i:i + size] for i in range(0, len(images), size)]


def _run(session: Any, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    from .onnx import run_onnx

    outs = [run_onnx(session, b) for b in batches]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def verify_int8(proto_int8: Any, reference: Any, held_out: np.ndarray, *, floors: Int8Floors = Int8Floors(),
                labels: np.ndarray | None = None) -> tuple[dict, list[str], dict | None, dict]:
    """Compare an int8 Q/DQ model with its fp32 reference on held-out images.

    Args:
        proto_int8: the int8 ``onnx.ModelProto``; run with its Q/DQ nodes as written (``exact_qdq``).
        reference: the fp32 PyTorch model, or the fp32 ``onnx.ModelProto`` (run on onnxruntime).
        held_out: images not used for calibration.
        floors: pass/fail limits.
        labels: class labels of ``held_out``, for the accuracy figures.

    Returns:
        ``(metrics, failures, accuracy, kernel_metrics)``: :func:`int8_metrics` of the Q/DQ graph, the floors it
        misses (empty: passed), top-1 accuracy of fp32 / int8 / int8 under onnxruntime's full graph optimizations
        when ``labels`` are given (else None), and the metrics of the latter (reported, not enforced).

    Raises:
        PrecisionError: no held-out images (or fewer than a fixed batch), or outputs that do not match.
    """
    import torch

    from .onnx import onnx_session, torch_outputs

    fixed = proto_int8.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    batches = _batches(np.ascontiguousarray(held_out, dtype=np.float32), fixed)
    if not batches:
        raise PrecisionError(f"no held-out images to verify on ({len(held_out)}, fixed batch {fixed})")
    n = sum(len(b) for b in batches)
    if isinstance(reference, torch.nn.Module):
        per_batch = torch_outputs(reference, [torch.from_numpy(b) for b in batches])
        ref = [np.concatenate([o[i] for o in per_batch]) for i in range(len(per_batch[0]))]
    else:
        ref = _run(onnx_session(reference), batches)
    exact = _run(onnx_session(proto_int8, exact_qdq=True), batches)
    kernels = _run(onnx_session(proto_int8), batches)
    metrics = int8_metrics(exact, ref)
    kernel_metrics = int8_metrics(kernels, ref)
    accuracy = None
    if labels is not None and metrics["classifier"]:
        y = np.asarray(labels)[:n]
        accuracy = {name: float((out[0].argmax(1) == y).mean()) for name, out in
                    (("fp32", ref), ("int8", exact), ("onnxruntime_optimized", kernels))}
    return metrics, _failures(metrics, floors), accuracy, kernel_metrics


def qat_qdq(proto_fp32: Any, quant: dict) -> Any:
    """Q/DQ from quantization-aware training's scales (:func:`repvgg_tools.training.qat.qat_state`), no calibration.

    A layer is matched to its Conv/Gemm node by its weight (``<layer>.weight``, the name the exporter keeps).

    Raises:
        PrecisionError: not a QAT record, or a Conv/Gemm without a scale in it.
    """
    from .qdq import QUANTIZED_OPS, insert_qdq

    if not isinstance(quant, dict) or not str(quant.get("format", "")).startswith("repvgg-tools qat int8"):
        raise PrecisionError("the checkpoint's 'quant' entry is not a QAT record of repvgg-tools")
    act, weight = quant["activation_scales"], quant["weight_scales"]
    thresholds, weight_scales = {}, {}
    for node in proto_fp32.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        layer = node.input[1].removesuffix(".weight")
        if layer not in act or layer not in weight:
            raise PrecisionError(f"the QAT record has no scales for {node.op_type} weight {node.input[1]!r}")
        thresholds.setdefault(node.input[0], float(act[layer]) * 127.0)
        weight_scales[node.input[1]] = np.asarray(weight[layer], dtype=np.float64).reshape(-1)
    return insert_qdq(proto_fp32, thresholds, weight_scales=weight_scales)


def export_int8(model: Any, proto_fp32: Any, calib: CalibrationSource, *, method: str = "minmax",
                floors: Int8Floors = Int8Floors(), reduce_range: bool = False, verify: bool = True,
                batch_size: int = 16, qat: dict | None = None) -> tuple[Any, Int8Report]:
    """Calibrate, quantize to TensorRT-style int8 Q/DQ, verify on held-out images and report.

    Args:
        model: the fp32 PyTorch model ``proto_fp32`` was exported from (the reference), or None to use
            ``proto_fp32`` on onnxruntime as the reference.
        proto_fp32: its fp32 ``onnx.ModelProto``.
        calib: calibration and held-out images (:class:`CalibrationSource`).
        method: ``minmax``, ``entropy`` or ``percentile``.
        floors: pass/fail limits of the check.
        reduce_range: 7-bit weights (for int8 kernels that saturate with full-range weights).
        verify: run the check (else the report is marked not verified and ``passed`` is False).
        batch_size: calibration batch size (a fixed-batch model uses its own).
        qat: the ``quant`` record of a quantization-aware-trained checkpoint: its scales are written as they are
            (no calibration; ``method`` and ``reduce_range`` do not apply), and the check runs as usual.

    Returns:
        ``(int8 proto, report)``. The caller decides what a failed report means; ``repvgg-export`` writes nothing.

    Raises:
        PrecisionError: unusable calibration data or method.
    """
    from .qdq import check_tensorrt_qdq

    start = time.perf_counter()
    if qat is not None:
        proto, method, used = qat_qdq(proto_fp32, qat), "qat", 0
    else:
        proto = quantize_int8(proto_fp32, calib.calibration, batch_size=batch_size, method=method,
                              reduce_range=reduce_range)
        fixed = proto_fp32.graph.input[0].type.tensor_type.shape.dim[0].dim_value
        used = len(calib.calibration) - (len(calib.calibration) % fixed if fixed > 0 else 0)
    report = Int8Report(source=calib.name, method=method, calibration_samples=used, synthetic=calib.synthetic,
                        floors=floors)
    report.seconds["calibrate"] = time.perf_counter() - start
    report.placement_problems = check_tensorrt_qdq(proto)
    if not verify:
        return proto, report
    start = time.perf_counter()
    metrics, failures, accuracy, kernels = verify_int8(proto, model if model is not None else proto_fp32,
                                                       calib.held_out, floors=floors, labels=calib.held_out_labels)
    report.verified, report.metrics, report.accuracy = True, metrics, accuracy
    report.held_out_samples = metrics["samples"]
    report.onnxruntime_optimized = kernels
    report.failures = failures + [f"Q/DQ placement: {p}" for p in report.placement_problems]
    report.seconds["verify"] = time.perf_counter() - start
    log.info("int8 check (%s): %s", "passed" if report.passed else "FAILED", report.summary())
    return proto, report


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
