"""Checks of every deploy path on one device (a CUDA GPU, or the CPU): both forms of a model, deploy-vs-training
equivalence, throughput, the ONNX export, and a TensorRT engine built the way ``tools/build_trt.py`` builds it.

These are the rows of ``tools/gpu_report.py``. Only torch is needed to import this module; torchvision (ResNets),
onnx/onnxruntime (export), onnxconverter_common (fp16 ONNX) and tensorrt/tensorrt_rtx are imported where used.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contract import FP32_RTOL, FP64_RTOL
from .timing import count_flops, time_on

__all__ = ["TORCHVISION_MODELS", "FP64_RTOL", "EngineUnsupported", "build_model", "model_cost", "prepare",
           "random_images", "equivalence", "throughput", "onnx_check", "engine_check", "environment"]

log = logging.getLogger(__name__)

TORCHVISION_MODELS = ("resnet18", "resnet50")
CL = torch.channels_last


class EngineUnsupported(Exception):
    """The TensorRT backend builds engines but cannot run them on this GPU (e.g. TensorRT-RTX on a Hopper GPU)."""


def build_model(name: str) -> nn.Module:
    """The training form of ``name``: ours from the registry, ``resnet18``/``resnet50`` from torchvision (random init,
    nothing downloaded).

    Raises:
        ImportError: torchvision is missing (for a ResNet). ValueError: an unknown name.
    """
    if name in TORCHVISION_MODELS:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    from ..models import create_model

    return create_model(name)


def model_cost(name: str, size: int) -> dict:
    """FLOPs per ``size x size`` image of both forms (``{"training", "deploy"}``) and the training form's parameter
    count, from models built on the meta device (nothing allocated or computed)."""
    from ..models import create_model

    def count() -> dict:
        train = build_model(name).eval()
        deploy = train if name in TORCHVISION_MODELS else create_model(name, deploy=True).eval()
        flops = {"training": count_flops(train, size), "deploy": count_flops(deploy, size)}
        return {"flops": flops, "params": sum(p.numel() for p in train.parameters())}

    try:
        with torch.device("meta"):
            return count()
    except ImportError:
        raise
    except Exception as exc:  # an operator without a meta kernel in some torch version: count for real
        log.warning("counting %s on the meta device failed (%s); counting on the CPU", name, exc)
        return count()


def prepare(name: str, device: torch.device | str, seed: int = 0) -> dict:
    """Both forms of ``name`` on ``device``, eval mode, channels_last; BatchNorm statistics randomized (seeded).

    Returns:
        ``{"training": module, "deploy": module, "params": {"training": n, "deploy": n}}``.
    """
    from ..reparam import reparameterize
    from ..verify import randomize_batchnorm

    torch.manual_seed(seed)
    train = randomize_batchnorm(build_model(name), seed=seed).eval().to(device)
    deploy = reparameterize(train)
    params = {form: sum(p.numel() for p in m.parameters()) for form, m in (("training", train), ("deploy", deploy))}
    return {"training": train.to(memory_format=CL), "deploy": deploy.to(memory_format=CL), "params": params}


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``(n, 3, size, size)`` standard-normal float32 images on the CPU, reproducible for a seed."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.float16) if precision == "fp16" else contextlib.nullcontext()


@torch.no_grad()
def equivalence(models: dict, device: torch.device, batch: int, size: int, seed: int = 1) -> dict:
    """Deploy vs training on ``device`` against docs/contract.md.

    fp32: both forms as given (TF32 as the caller set it), ``max|a-b|/max|b| <= 1e-5``. float64: the training form in
    float64, re-parameterized in float64 on the device, ``<= 1e-12`` (the fusion math alone), and every tensor of the
    deploy form must be that float64 fusion rounded once (so the float64 verdict is about ``deploy``). fp16: the deploy
    form under ``torch.autocast(float16)`` against the fp32 training form: cosine >= 0.9999 and the same top-1 on
    >= 99%.
    Also reported: the training form's own fp32 error against float64 (the kernels' share of the fp32 error).

    Args:
        models: from :func:`prepare`.
        device: where both run.
        batch, size: random inputs ``(batch, 3, size, size)``.

    Returns:
        The figures, a verdict per precision and ``passed``.
    """
    import numpy as np

    from ..contract import max_errors
    from ..export.metrics import check_metrics, output_metrics
    from ..reparam import reparameterize

    train, deploy = models["training"], models["deploy"]
    x = random_images(batch, size, seed).to(device).contiguous(memory_format=CL)
    ref, cand = train(x), deploy(x)
    train64 = copy.deepcopy(train).double()
    x64 = x.double()
    ref64 = train64(x64)
    fused64 = reparameterize(train64, inplace=True)
    cand64 = fused64(x64)
    # the deploy model reported on must be that float64 fusion rounded once: without this the float64 figure says
    # nothing about ``deploy`` (a wrong deploy model would pass it)
    exact = fused64.state_dict()
    written = deploy.state_dict()
    not_rounded = sorted(k for k, w in written.items() if k not in exact or w.shape != exact[k].shape
                         or not torch.equal(w, exact[k].to(w.dtype))) + sorted(set(exact) - set(written))
    del train64, fused64, exact
    with _autocast(device, "fp16"):
        half = deploy(x)
    rel32, rel64 = max_errors(cand, ref)[1], max_errors(cand64, ref64)[1]
    noise = max_errors(ref, ref64)[1]
    metrics = output_metrics([half.float().cpu().numpy()], [ref.cpu().numpy().astype(np.float64)])
    ok16, summary16 = check_metrics(metrics, "fp16")
    result = {"samples": batch, "fp32_max_rel": rel32, "fp32_rtol": FP32_RTOL, "fp32_passed": rel32 <= FP32_RTOL,
              "fp64_max_rel": rel64, "fp64_rtol": FP64_RTOL, "fp64_not_rounded_once": not_rounded[:5],
              "fp64_passed": rel64 <= FP64_RTOL and not not_rounded,
              "fp32_noise_training_vs_fp64": noise, "fp16_dtype": str(half.dtype).replace("torch.", ""),
              "fp16_cosine": metrics["cosine"], "fp16_top1_agreement": metrics["top1_agreement"],
              "fp16_max_rel": metrics["max_rel"], "fp16_passed": ok16, "fp16_summary": summary16}
    result["passed"] = result["fp32_passed"] and result["fp64_passed"] and ok16
    log.info("equivalence on %s: fp32 %.2e, fp64 %.2e, fp16 %s", device, rel32, rel64, summary16)
    return result


def throughput(model: nn.Module, precision: str, device: torch.device, batch: int, size: int, iters: int,
               warmup: int) -> dict:
    """images/s of ``model`` on random channels_last input, fp32 or fp16 autocast, median of ``iters`` timed runs
    (CUDA events on a GPU) after ``warmup``; ``{"error": "OOM"}`` when the GPU runs out of memory."""
    try:
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=CL)
        with torch.inference_mode(), _autocast(device, precision):
            t = time_on(device, lambda: model(x), iters, warmup)
    except torch.cuda.OutOfMemoryError:
        x = None
        torch.cuda.empty_cache()
        return {"error": "OOM"}
    return {**t, "images_per_s": batch / (t["median_ms"] / 1e3)}


def onnx_check(models: dict, size: int, batch: int, seed: int = 2) -> tuple[Any, dict]:
    """Export the deploy form to an fp32 ONNX (dynamic batch) and verify it on onnxruntime CPU (fp32 contract).

    Returns:
        ``(onnx.ModelProto, metrics)`` with ``passed`` and ``summary`` (see ``verify_onnx``).
    """
    from ..export.onnx import export_onnx, onnx_session, verify_onnx

    deploy = copy.deepcopy(models["deploy"]).float().cpu().to(memory_format=torch.contiguous_format)
    proto = export_onnx(deploy, size, batch=1)
    result = verify_onnx(onnx_session(proto), deploy, "fp32", [random_images(batch, size, seed)])
    keep = ("max_rel", "max_abs", "cosine", "top1_agreement", "passed", "summary", "samples")
    return proto, {k: result[k] for k in keep}


def engine_check(models: dict, fp32_onnx: Any, precision: str, backend: Any, *, size: int, batch: int,
                 check_batch: int, iters: int, warmup: int, calib_samples: int = 32) -> dict:
    """Build one engine from the deploy form's ONNX with ``export.tensorrt.build_engine`` (tools/build_trt.py's code
    path), compare it with the PyTorch deploy form (``export.tensorrt.compare``, the GPU tests' contract), time it.

    fp16 comes from an fp16 ONNX (onnxconverter_common) or, on TensorRT 10, from the FP16 builder flag; int8 from a
    Q/DQ ONNX calibrated on random images (the weights are random too), checked on other random images.

    Args:
        models: from :func:`prepare` (on the CUDA device).
        fp32_onnx: from :func:`onnx_check`.
        precision: ``fp32``, ``fp16`` or ``int8``.
        backend: a loaded ``export.tensorrt.Backend``.
        size, batch: input side and the engine's batch (profile 1..batch, tuned for batch; timed at batch).
        check_batch: inputs of the comparison.
        iters, warmup: timed and untimed runs.
        calib_samples: int8 calibration images.

    Returns:
        Build time, verdict, agreement figures, images/s and latency; or ``{"skipped": reason}`` when the
        precision needs a package that is missing.

    Raises:
        EngineUnsupported: the engine was built but the backend cannot run it on this GPU.
    """
    from ..export import tensorrt as trt
    from ..export import trt_runtime
    from ..export.onnx import save_onnx

    build_precision, proto = "auto", fp32_onnx
    if precision == "fp16":
        try:
            from ..export.precision import to_fp16

            proto = to_fp16(fp32_onnx)
        except ImportError as exc:
            if not backend.has_precision_flags:
                return {"skipped": f"an fp16 ONNX needs onnxconverter_common ({exc}), and {backend.name} "
                                   f"{backend.version} has no FP16 builder flag"}
            build_precision = "fp16"
    elif precision == "int8":
        from ..export.int8 import quantize_int8

        proto = quantize_int8(fp32_onnx, random_images(calib_samples, size, seed=3).numpy())
    with tempfile.TemporaryDirectory(prefix="repvgg-engine-") as tmp:
        path = save_onnx(proto, Path(tmp) / f"{precision}.onnx")
        engine, info, _ = trt.build_engine(path, backend=backend, precision=build_precision, min_batch=1,
                                           opt_batch=batch, max_batch=batch)
    try:
        runner = trt_runtime.EngineRunner(engine, backend.name)
    except trt.TensorRTError as exc:
        raise EngineUnsupported(f"{backend.name} {backend.version} builds engines but cannot run them on this GPU "
                                f"({exc})") from None
    check = trt_runtime.compare(runner, models["deploy"], [random_images(check_batch, size, seed=4)], precision)
    bench = trt_runtime.benchmark(runner, batch=batch, iters=iters, warmup=warmup)
    return {"build_seconds": info["build_seconds"], "engine_bytes": info["engine_bytes"],
            "strongly_typed": info["strongly_typed"], "builder_flags": info["builder_flags"],
            "passed": check["passed"], "summary": check["summary"], "cosine": check["cosine"],
            "top1_agreement": check["top1_agreement"], "max_rel": check["max_rel"],
            "images_per_s": bench["throughput"], "latency_ms": bench["latency_ms"]}


def environment(device: torch.device) -> dict:
    """Machine, versions (GPU name, driver, torch, CUDA, cuDNN, installed packages) and the torch settings in force.

    Package versions come from their metadata (nothing is imported: a TensorRT import is not harmless everywhere).
    """
    import importlib.metadata

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": str(device), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), driver=_driver_version())
    packages = {}
    for dist in ("torchvision", "numpy", "onnx", "onnxruntime", "onnxconverter-common", "onnxslim", "matplotlib",
                 "tensorrt", "tensorrt-rtx"):
        try:
            packages[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            packages[dist] = None
    env["installed"] = packages
    return env


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except OSError:
        return "unknown (no nvidia-smi, no /proc/driver/nvidia/version)"
