"""The numerical contract (docs/contract.md): every tolerance and floor, and the one measure of agreement.

Every check in the toolkit judges ``max|a-b| / max|b|`` (the largest absolute error relative to the largest
magnitude of the reference, over all outputs: :func:`max_errors`) against a constant defined here, and only here
(``tests/test_contract.py`` fails on a tolerance defined anywhere else). Importing this module imports neither torch
nor numpy, so argument parsers can quote the defaults.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FP64_RTOL", "FP32_RTOL", "FP16_RTOL", "BF16_RTOL", "DTYPE_RTOL", "rtol_for",
    "FUSION_RTOL", "GRAPH_FUSER_RTOL", "ONNX_FP32_RTOL", "ENGINE_FP32_RTOL", "RUNTIME_RTOL",
    "FP16_MIN_COSINE", "FP16_MIN_TOP1",
    "INT8_MIN_TOP1", "INT8_MIN_COSINE", "INT8_MIN_FEATURE_COSINE", "INT8_MAX_REL_ERROR", "DETECTION_SCORE_TOL",
    "flatten_outputs", "max_errors",
]

# --- deploy vs training, the same network in one dtype: max|a-b| / max|b| over all outputs -------------------------
# float64: the fusion math alone; correct conversions measure 5e-16..7.7e-13 (timm repvgg_d2se with randomized BNs
# is the worst), a fused weight off by 1e-6 relative 2e-9: 1e-12 sits above the one and far below the other
FP64_RTOL = 1e-12
# float32: the design contract for full models with randomized BN statistics (every registered model, docs/qarepvgg.md;
# fp32 rounding of the fused weights, amplified by the network, stays below it)
FP32_RTOL = 1e-5
# float16 (eps 9.8e-4): weights rounded to fp16 once; a correct repvgg_a0 measures 1.9e-4..5e-4 (docs/convert.md,
# tests/test_fuser_convert.py), the tiny RepVGG of tests/test_reparam.py stays below 5e-3 against float64
FP16_RTOL = 5e-3
# bfloat16 (eps 7.8e-3, 8x fp16's): 5e-3 measured on repvgg_a0 (docs/convert.md); 8x the fp16 bound
BF16_RTOL = 4e-2
# the table rtol_for reads, by dtype name (torch and numpy spell these the same)
DTYPE_RTOL = {"float64": FP64_RTOL, "float32": FP32_RTOL, "float16": FP16_RTOL, "bfloat16": BF16_RTOL}

# --- fusion checks, judged in float64 whatever the weights' dtype ---------------------------------------------------
# repvgg-convert check (a): float64 training form vs the unrounded float64 fusion. Correct conversions 5e-16..7.7e-13
# (timm repvgg_d2se, randomized BNs; repvgg_a0, b1g4, vgg16_bn, qarepvgg_a0, fp16/bf16/fp64 files 2e-15..5e-15);
# small wrong fusions 2e-9 (one fused weight off by 1e-6 relative) and 1e-8 (BN eps off by 1e-3 relative): 1e-10
# sits two orders above the one and one below the other
FUSION_RTOL = 1e-10
# graph fuser, each replacement's float64 check (this, or 10 ulp of the model's dtype if larger: constants a model
# computes itself, such as DBB's pad values, are exact to its own precision only); the same gap as FUSION_RTOL
GRAPH_FUSER_RTOL = 1e-10

# --- other runtimes against the torch deploy model, fp32 ------------------------------------------------------------
# ONNX fp32 on onnxruntime CPU vs torch (docs/deploy.md): other kernels sum in other orders (1e-6..1e-5 measured on
# RepVGG with random weights, outputs up to 1e4); a wrong graph is off by 1e-2 or more
ONNX_FP32_RTOL = 1e-4
# a TensorRT fp32 engine vs torch fp32 on the GPU, TF32 off on both sides: GPU kernels (tactics) sum in other orders
# than onnxruntime's, so 10x the ONNX bound
ENGINE_FP32_RTOL = 1e-3
# fastest_cpu_runner: a candidate backend (torch NCHW / channels_last / onnxruntime) vs the torch deploy model; the
# onnxruntime candidate is an ONNX fp32 export, so the ONNX bound (channels_last torch measures ~1e-7)
RUNTIME_RTOL = ONNX_FP32_RTOL

# --- fp16 deploy vs fp32 (docs/contract.md); max rel err is reported, not judged ---------------------------------
# lowest per-sample cosine similarity of fp16 and fp32 outputs: correct fp16 RepVGG exports measure >= 0.99999
FP16_MIN_COSINE = 0.9999
# share of inputs with the same top-1 class as fp32 (ties between near-equal logits may flip a few)
FP16_MIN_TOP1 = 0.99

# --- int8 Q/DQ vs fp32 on held-out images (repvgg_tools/export/int8.py's docstring has the measurements) ------------
# top-1 agreement: correct 98.4-99.2%, wrong calibration 91.6-92.8% and much lower for wrong scales
INT8_MIN_TOP1 = 0.95
# mean logit cosine: correct 0.9989-0.9995, uniform-noise calibration 0.945-0.980, a 100x activation scale <= 0.95
INT8_MIN_COSINE = 0.99
# mean cosine per feature map (feature exports): correct A0 stage maps 0.989-0.999, noise calibration 0.913-0.953
INT8_MIN_FEATURE_COSINE = 0.97
# mean ||int8 - fp32|| / ||fp32|| per output (what cosine cannot see: magnitude): correct 0.03-0.14, wrong 0.32-0.39
INT8_MAX_REL_ERROR = 0.3

# --- detectors ------------------------------------------------------------------------------------------------------
# compare_detections' default largest score difference (absolute: scores are probabilities in [0, 1]); fp32 deploy vs
# training detectors differ by < 1e-6, so a swapped or dropped detection is what fails (box tolerances scale with the
# image size and are the caller's)
DETECTION_SCORE_TOL = 1e-4


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    if type(dtype).__module__.startswith("torch"):  # torch.dtype
        return str(dtype).removeprefix("torch.")
    import numpy as np

    return np.dtype(dtype).name


def rtol_for(dtype: Any) -> float:
    """Tolerance of ``max|a-b| / max|b|`` between the deploy and the training form of a model held in ``dtype``.

    Args:
        dtype: a torch or numpy floating dtype, or its name (``"float32"``, ``"torch.float16"``).

    Returns:
        The :data:`DTYPE_RTOL` entry.

    Raises:
        ValueError: a dtype the contract has no tolerance for.
    """
    name = _dtype_name(dtype)
    if name not in DTYPE_RTOL:
        raise ValueError(f"no tolerance for dtype {name}; the contract covers {', '.join(DTYPE_RTOL)}")
    return DTYPE_RTOL[name]


def _is_array(x: Any) -> bool:
    """A torch tensor or a numpy array (or numpy scalar), without importing either."""
    module = type(x).__module__
    return (module.startswith("torch") and hasattr(x, "detach")) or (module.startswith("numpy") and hasattr(x, "dtype"))


def flatten_outputs(out: Any) -> list:
    """Tensors/arrays of a model output, in a stable order: a tensor or array, list/tuple, or dict (sorted by key).

    Raises:
        TypeError: anything else.
    """
    if _is_array(out):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    raise TypeError(f"cannot compare outputs of type {type(out).__name__}")


def _pair(c: Any, r: Any) -> tuple[float, float] | None:
    """``(max|c-r|, max|r|)`` of one output in float64 (torch on the tensors' device, else numpy); None: not finite."""
    if type(c).__module__.startswith("torch") and type(r).__module__.startswith("torch"):
        c64, r64 = c.detach().double(), r.detach().double().to(c.device)
        if not (c64.isfinite().all() and r64.isfinite().all()):
            return None
        return ((c64 - r64).abs().max().item(), r64.abs().max().item()) if c64.numel() else (0.0, 0.0)
    import numpy as np

    c64, r64 = (np.asarray(x.detach().cpu().double().numpy() if type(x).__module__.startswith("torch") else x,
                           dtype=np.float64) for x in (c, r))
    if not (np.isfinite(c64).all() and np.isfinite(r64).all()):
        return None
    return (float(np.abs(c64 - r64).max()), float(np.abs(r64).max())) if c64.size else (0.0, 0.0)


def max_errors(candidate: Any, reference: Any) -> tuple[float, float]:
    """``(max_abs, max_rel)``: ``max|a-b|`` and ``max|a-b| / max|b|`` over all outputs, computed in float64.

    The one measure every check of the toolkit judges. Relative to the reference's scale, not element-wise: RepVGG
    outputs with random weights reach 1e4 and pass through zero, so neither a fixed absolute tolerance nor a
    per-element ratio means anything.

    Args:
        candidate: the output to judge: a torch tensor or numpy array, or a list/tuple/dict of them.
        reference: the output it must reproduce, of the same structure and shapes.

    Returns:
        ``(max_abs, max_rel)``; ``(inf, inf)`` when either side holds NaN or Inf. A zero reference gives
        ``max_rel`` 0 if the candidate is zero too, else inf.

    Raises:
        ValueError: the outputs differ in count or shape. TypeError: not tensors or arrays.
    """
    cands, refs = flatten_outputs(candidate), flatten_outputs(reference)
    if len(cands) != len(refs):
        raise ValueError(f"outputs differ in count: {len(cands)} vs {len(refs)}")
    for c, r in zip(cands, refs, strict=True):
        if tuple(c.shape) != tuple(r.shape):
            raise ValueError(f"output shapes differ: {tuple(c.shape)} vs {tuple(r.shape)}")
    max_abs, scale = 0.0, 0.0
    for c, r in zip(cands, refs, strict=True):
        pair = _pair(c, r)
        if pair is None:
            return float("inf"), float("inf")
        max_abs, scale = max(max_abs, pair[0]), max(scale, pair[1])
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, max_rel
