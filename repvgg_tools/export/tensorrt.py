"""TensorRT engines: backend detection, build planning, engine building (running them:
:mod:`repvgg_tools.export.trt_runtime`).

Backends: ``tensorrt`` (10.x and 11.x) and ``tensorrt_rtx``, both imported lazily. TensorRT 11 and TensorRT-RTX only
build strongly typed networks (precision comes from the ONNX: fp16 tensors or Q/DQ nodes); TensorRT 10 also has the
FP16 builder flag, which is used only to build an fp16 engine from an fp32 ONNX. A request that the backend cannot
honour is refused with :class:`BuildRefused`, never turned into a silent fp32 engine.

Building works without a GPU on TensorRT-RTX (ahead-of-time, portable engines); running an engine needs CUDA.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.errors import one_line
from .precision import onnx_precision

__all__ = [
    "BACKENDS", "TensorRTError", "BackendUnavailable", "BuildRefused", "BuildFailed", "Backend", "BuildPlan",
    "load_backend", "plan_build", "batch_profile", "build_engine",
]

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "tensorrt_rtx")


class TensorRTError(Exception):
    """Base of this module's errors; messages are one line."""


class BackendUnavailable(TensorRTError):
    """No usable TensorRT backend (not installed, libraries missing, unsupported version)."""


class BuildRefused(TensorRTError, ValueError):
    """The request cannot be honoured by this backend/ONNX (e.g. fp16 from an fp32 ONNX on a strongly typed one)."""


class BuildFailed(TensorRTError, RuntimeError):
    """The ONNX parser or the builder failed."""


@dataclass
class Backend:
    """An imported TensorRT backend module with its name and version."""

    name: str
    module: Any
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def has_precision_flags(self) -> bool:
        """Whether ``BuilderFlag.FP16`` exists (TensorRT 10; TensorRT 11 and TensorRT-RTX are strongly typed only)."""
        return self.name == "tensorrt" and hasattr(self.module.BuilderFlag, "FP16")


@dataclass
class BuildPlan:
    """How to build: the engine's precision, whether strongly typed, which builder flags."""

    precision: str
    onnx_precision: str
    strongly_typed: bool
    flags: list[str] = field(default_factory=list)


def load_backend(name: str = "auto") -> Backend:
    """Import a backend: ``"tensorrt"``, ``"tensorrt_rtx"``, or ``"auto"`` (TensorRT first, then TensorRT-RTX).

    Raises:
        BackendUnavailable: none of the candidates imports, or TensorRT is older than 10.
    """
    if name not in ("auto", *BACKENDS):
        raise BackendUnavailable(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    reasons = []
    for candidate in BACKENDS if name == "auto" else (name,):
        try:
            module = importlib.import_module(candidate)
            version = str(module.__version__)
        except Exception as exc:  # ImportError, OSError from missing libraries, AttributeError from stubs
            reasons.append(f"{candidate}: {one_line(exc)}")
            continue
        backend = Backend(candidate, module, version)
        if candidate == "tensorrt" and backend.major < 10:
            reasons.append(f"tensorrt {version} is too old (10 or later is needed)")
            continue
        log.info("backend %s %s", candidate, version)
        return backend
    raise BackendUnavailable("no usable TensorRT backend (" + "; ".join(reasons) + ")")


def plan_build(backend: Backend, requested: str, onnx_prec: str) -> BuildPlan:
    """Decide how to build ``requested`` precision (``auto|fp32|fp16|int8``) from an ONNX of ``onnx_prec``.

    The engine's precision is the ONNX's (strongly typed) unless TensorRT 10 can add it with a builder flag (only
    fp16 from fp32: the FP16 flag lets TensorRT choose fp16 kernels layer by layer). INT8 always comes from Q/DQ
    nodes (calibrators are deprecated in 10 and gone in 11).

    Raises:
        BuildRefused: anything else, with the command that produces a suitable ONNX.
    """
    if requested not in ("auto", "fp32", "fp16", "int8"):
        raise BuildRefused(f"unknown precision {requested!r}")
    if requested in ("auto", onnx_prec):
        return BuildPlan(onnx_prec, onnx_prec, strongly_typed=True)
    label = f"{backend.name} {backend.version}"
    export = f"export the model with `repvgg-export CHECKPOINT OUT.onnx --precision {requested}`"
    if requested == "fp16" and onnx_prec == "fp32":
        if backend.has_precision_flags:
            return BuildPlan("fp16", onnx_prec, strongly_typed=False, flags=["FP16"])
        raise BuildRefused(f"{label} builds strongly typed networks whose precision comes from the ONNX, and this "
                           f"ONNX is fp32; {export} (or build with --precision auto for an fp32 engine)")
    if requested == "int8":
        raise BuildRefused(f"INT8 needs explicit Q/DQ nodes in the ONNX (this one is {onnx_prec}; {label} has no "
                           f"calibrator path); {export}")
    raise BuildRefused(f"this ONNX is {onnx_prec}: an engine cannot be built at {requested} from it; {export}")


def batch_profile(onnx_batch: int | str | None, min_batch: int | None, opt_batch: int | None,
                  max_batch: int | None) -> tuple[int, int, int]:
    """``(min, opt, max)`` batch of the optimization profile for an ONNX input whose batch axis is ``onnx_batch``.

    A symbolic axis (a name, or None/0) takes the given values (defaults 1/8/32); a fixed one allows only itself.

    Raises:
        BuildRefused: ``min <= opt <= max`` does not hold, a value is below 1, or it differs from a fixed batch.
    """
    if isinstance(onnx_batch, int) and onnx_batch > 0:
        given = {v for v in (min_batch, opt_batch, max_batch) if v is not None}
        if given - {onnx_batch}:
            raise BuildRefused(f"the ONNX has a fixed batch of {onnx_batch}, so the profile cannot be "
                               f"{min_batch}/{opt_batch}/{max_batch}; export it with dynamic batch (the default of "
                               "repvgg-export) or leave out --min/--opt/--max-batch")
        return onnx_batch, onnx_batch, onnx_batch
    lo = min_batch if min_batch is not None else 1
    hi = max_batch if max_batch is not None else max(32, lo)
    opt = opt_batch if opt_batch is not None else min(max(8, lo), hi)
    if not 1 <= lo <= opt <= hi:
        raise BuildRefused(f"batch profile must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    return lo, opt, hi


def build_engine(
    onnx_path: str | os.PathLike, *, backend: str | Backend = "auto", precision: str = "auto",
    min_batch: int | None = None, opt_batch: int | None = None, max_batch: int | None = None,
    workspace_mb: int | None = None, timing_cache: bytes | None = None, use_timing_cache: bool = False,
    tf32: bool = False, verbose: bool = False,
) -> tuple[bytes, dict, bytes | None]:
    """Build a serialized engine from an ONNX file.

    Args:
        onnx_path: the model (external data next to it is found by the parser).
        backend: ``auto``, ``tensorrt``, ``tensorrt_rtx`` or a loaded :class:`Backend`.
        precision: ``auto`` (the ONNX's), ``fp32``, ``fp16`` or ``int8``; see :func:`plan_build`.
        min_batch, opt_batch, max_batch: batch profile of every input (see :func:`batch_profile`).
        workspace_mb: workspace memory pool limit.
        timing_cache: serialized timing cache to start from.
        use_timing_cache: use (and return) a timing cache; ignored without a CUDA GPU (nothing is timed).
        tf32: allow TF32 math for fp32 layers (off by default: an fp32 engine computes in fp32).
        verbose: TensorRT's verbose log.

    Returns:
        ``(engine bytes, info for the JSON sidecar, serialized timing cache or None)``.

    Raises:
        BackendUnavailable, BuildRefused, BuildFailed.
    """
    import onnx

    start = time.perf_counter()
    onnx_path = Path(onnx_path)
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError
        raise BuildRefused(f"{onnx_path}: not a readable ONNX model ({one_line(exc)})") from None
    onnx_prec = onnx_precision(proto)
    init = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init]
    profiles = {}
    for inp in inputs:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
            raise BuildRefused(f"input {inp.name!r} has dynamic non-batch axes {dims}; export with a fixed input size")
        lo, opt, hi = batch_profile(dims[0] if dims else None, min_batch, opt_batch, max_batch)
        rest = [int(d) for d in dims[1:]]
        profiles[inp.name] = {"min": [lo, *rest], "opt": [opt, *rest], "max": [hi, *rest]}
    del proto
    be = backend if isinstance(backend, Backend) else load_backend(backend)
    plan = plan_build(be, precision, onnx_prec)
    trt = be.module
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [one_line(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildFailed(f"{be.name} cannot parse {onnx_path}: " + " | ".join(errors or ["unknown parser error"]))
    config = builder.create_builder_config()
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if hasattr(trt.BuilderFlag, "TF32") and not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache, gpu = None, _gpu_name()
    if use_timing_cache and gpu is None:
        log.warning("no CUDA GPU: kernels are not timed, so the timing cache is neither read nor written")
    elif use_timing_cache:
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildFailed(f"{be.name} could not build an engine from {onnx_path} (rerun with --verbose for the log)")
    engine = bytes(serialized)
    cache_bytes = bytes(cache.serialize()) if cache is not None else None

    def tensors(count: int, get: Callable[[int], Any]) -> list[dict]:
        return [{"name": t.name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
                for t in (get(i) for i in range(count))]

    info = {
        "backend": be.name, "version": be.version, "gpu": gpu, "onnx": str(onnx_path),
        "precision": plan.precision, "onnx_precision": plan.onnx_precision, "strongly_typed": plan.strongly_typed,
        "builder_flags": plan.flags, "tf32": bool(tf32 and hasattr(trt.BuilderFlag, "TF32")),
        "profiles": [profiles], "workspace_mb": workspace_mb, "timing_cache": cache is not None,
        "inputs": tensors(network.num_inputs, network.get_input),
        "outputs": tensors(network.num_outputs, network.get_output),
        "engine_bytes": len(engine), "build_seconds": round(time.perf_counter() - start, 3),
    }
    log.info("built %s engine (%d bytes) in %.2f s", plan.precision, len(engine), info["build_seconds"])
    return engine, info, cache_bytes


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8"}


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).rsplit(".", 1)[-1]
    return _DTYPE_NAMES.get(name, name.lower())


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA install must not stop a CPU-side build
        return None


