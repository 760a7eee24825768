"""Running TensorRT engines: a runner over torch CUDA tensors, the comparison with PyTorch under each precision's
contract, and a benchmark. Building them is :mod:`repvgg_tools.export.tensorrt`."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..contract import ENGINE_FP32_RTOL
from .metrics import check_metrics, output_metrics
from .tensorrt import TensorRTError, _dtype_name, _gpu_name, load_backend

__all__ = ["EngineRunner", "compare", "benchmark"]


def _torch_dtype(dtype: Any):
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
             "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}
    name = _dtype_name(dtype)
    if name not in table:
        raise TensorRTError(f"unsupported engine tensor type {name}")
    return table[name]


class EngineRunner:
    """Runs a serialized engine on torch CUDA tensors (named tensor addresses, ``execute_async_v3``).

    Args:
        engine: a path to an engine file, or its bytes.
        backend: ``auto`` or the backend that built it.
        device: CUDA device.

    Raises:
        TensorRTError: no CUDA, or the engine cannot be deserialized by this backend/GPU.
    """

    def __init__(self, engine: str | os.PathLike | bytes, backend: str = "auto", device: str = "cuda") -> None:
        import torch

        if not torch.cuda.is_available():
            raise TensorRTError("running a TensorRT engine needs a CUDA GPU, and torch sees none")
        self.device = torch.device(device)
        self.backend = load_backend(backend)
        trt = self.backend.module
        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise TensorRTError(f"{self.backend.name} {self.backend.version} cannot deserialize this engine "
                                "(built by another version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}

    def profile_shapes(self, name: str | None = None) -> list[tuple[int, ...]]:
        """``[min, opt, max]`` shapes of an input (the first by default) in optimization profile 0."""
        shapes = self.engine.get_tensor_profile_shape(name or self.input_names[0], 0)
        return [tuple(s) for s in shapes]

    def __call__(self, *inputs, sync: bool = True) -> list:
        """Run on one batch per input; returns the outputs (CUDA tensors) in engine order."""
        import torch

        if len(inputs) != len(self.input_names):
            raise ValueError(f"the engine takes {len(self.input_names)} inputs, got {len(inputs)}")
        stream = torch.cuda.current_stream(self.device)
        keep = []
        for name, x in zip(self.input_names, inputs, strict=True):
            x = x.to(self.device, self.dtypes[name]).contiguous()
            keep.append(x)
            if not self.context.set_input_shape(name, tuple(x.shape)):
                lo, _, hi = self.profile_shapes(name)
                raise ValueError(f"input {name!r} shape {tuple(x.shape)} is outside the engine's profile {lo}..{hi}")
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = []
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("execute_async_v3 failed")
        if sync:
            stream.synchronize()
        return outputs


def compare(runner: EngineRunner, reference: Any, inputs: Sequence, precision: str = "fp32") -> dict:
    """Compare an engine with a reference on ``inputs`` (CPU or CUDA tensors, one batch each).

    Args:
        runner: the engine.
        reference: a PyTorch module (moved to the engine's device, run in float32 without TF32) or an
            onnxruntime session.
        inputs: batches.
        precision: the contract to check (see :func:`~repvgg_tools.export.metrics.check_metrics`); fp32 engines
            are held to ``ENGINE_FP32_RTOL`` (1e-3) relative error instead of ONNX's 1e-4 (GPU kernels sum in other
            orders; TF32 is off on both sides).

    Returns:
        Metrics with ``passed`` and ``summary``.
    """
    import numpy as np
    import torch

    cand, ref = [], []
    for x in inputs:
        cand.append([o.float().cpu().numpy() for o in runner(x)])
        if hasattr(reference, "run") and hasattr(reference, "get_inputs"):
            from .onnx import run_onnx

            ref.append(run_onnx(reference, x.cpu()))
        else:
            with torch.no_grad(), _no_tf32():
                module = reference.eval().float().to(runner.device)
                out = module(x.to(runner.device).float())
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            ref.append([o.double().cpu().numpy() for o in outs])
    cat = [np.concatenate([c[i] for c in cand]) for i in range(len(cand[0]))]
    rcat = [np.concatenate([r[i] for r in ref]) for i in range(len(ref[0]))]
    metrics = output_metrics(cat, rcat)
    if precision == "fp32":
        passed = metrics["finite"] and metrics["max_rel"] <= ENGINE_FP32_RTOL
        summary = f"max rel err {metrics['max_rel']:.3e} (tolerance {ENGINE_FP32_RTOL:.0e})"
    else:
        passed, summary = check_metrics(metrics, precision)
    metrics.update(passed=passed, summary=summary, precision=precision)
    return metrics


@contextlib.contextmanager
def _no_tf32():
    """Disable TF32 in torch's CUDA convolutions and matmuls for an fp32 reference."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def benchmark(engine: str | os.PathLike | bytes | EngineRunner, batch: int = 1, iters: int = 100, warmup: int = 10,
              backend: str = "auto") -> dict:
    """Latency and throughput of an engine on random inputs of ``batch`` (within its profile).

    Returns:
        ``backend``, ``version``, ``gpu``, ``batch``, ``iters``, ``throughput`` (images/s), ``latency_ms`` with
        ``mean``, ``p50``, ``p90``, ``p99`` (per batch, from CUDA events).
    """
    import numpy as np
    import torch

    runner = engine if isinstance(engine, EngineRunner) else EngineRunner(engine, backend)
    inputs = []
    for name in runner.input_names:
        lo, _, hi = runner.profile_shapes(name)
        if not lo[0] <= batch <= hi[0]:
            raise ValueError(f"batch {batch} is outside the engine's profile {lo[0]}..{hi[0]}")
        shape = (batch, *hi[1:])
        inputs.append(torch.randn(shape, device=runner.device).to(runner.dtypes[name]))
    for _ in range(warmup):
        runner(*inputs)
    times = []
    start_all = time.perf_counter()
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner(*inputs, sync=False)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    total = time.perf_counter() - start_all
    lat = np.asarray(times)
    return {
        "backend": runner.backend.name, "version": runner.backend.version, "gpu": _gpu_name(), "batch": batch,
        "iters": iters, "throughput": batch * iters / total,
        "latency_ms": {"mean": float(lat.mean()), "p50": float(np.percentile(lat, 50)),
                       "p90": float(np.percentile(lat, 90)), "p99": float(np.percentile(lat, 99))},
    }
