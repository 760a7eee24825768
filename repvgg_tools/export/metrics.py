"""How close an exported model's outputs are to PyTorch's, and the pass/fail rule of each precision (the fp32, fp16
and int8 contract of docs/contract.md; the int8 floors on held-out images are :mod:`repvgg_tools.export.int8`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..contract import FP16_MIN_COSINE, FP16_MIN_TOP1, ONNX_FP32_RTOL, max_errors
from .precision import FP16_MAX, PRECISIONS

__all__ = ["output_metrics", "max_activation", "check_metrics"]


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
    """``(passed, reason)`` of the verification contract for a precision (see docs/contract.md).

    fp32: ``max_rel <= ONNX_FP32_RTOL`` (1e-4); fp16: cosine >= ``FP16_MIN_COSINE`` (0.9999), the same top-1 on
    >= ``FP16_MIN_TOP1`` (99%) of samples (constants of :mod:`repvgg_tools.contract`) and, when ``metrics``
    has ``max_activation`` (see :func:`max_activation`), no activation beyond fp16's 65504; int8: finite outputs
    only (the int8 contract, floors on held-out images, is :func:`repvgg_tools.export.int8.verify_int8`).
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
