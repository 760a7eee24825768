"""Run a deploy model on the fastest CPU backend of this machine: torch NCHW, torch channels_last or onnxruntime.

Which one wins depends on the CPU, the model and the batch (on the 2-core AVX2 machines we test on, onnxruntime
beat torch by 1.2-1.3x for RepVGG-A0/B0 at batch 8, and channels_last beat NCHW for B0 but not A0), so the choice is
measured, not guessed. Every candidate is checked against the torch deploy model before it is timed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .bench.timing import time_callable
from .contract import RUNTIME_RTOL, max_errors
from .reparam import reparameterize

__all__ = ["CPU_BACKENDS", "CpuRunner", "fastest_cpu_runner"]

log = logging.getLogger(__name__)

CPU_BACKENDS = ("torch", "torch_channels_last", "onnxruntime")


@dataclass
class CpuRunner:
    """A callable running one backend; ``timings_ms`` holds the median latency of every candidate measured."""

    backend: str
    fn: Callable[[Tensor], Tensor | list[Tensor]]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def __call__(self, x: Tensor) -> Tensor | list[Tensor]:
        return self.fn(x)


def _torch_fn(model: nn.Module, channels_last: bool) -> Callable:
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def run(x: Tensor):
        with torch.inference_mode():
            return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    return run


def _onnxruntime_fn(model: nn.Module, example: Tensor) -> Callable:
    from .export.onnx import export_onnx, onnx_session

    proto = export_onnx(model, tuple(example.shape[-2:]), batch=example.shape[0], in_chans=example.shape[1])
    session = onnx_session(proto, threads=torch.get_num_threads())
    name = session.get_inputs()[0].name

    def run(x: Tensor):
        outs = [torch.from_numpy(o) for o in session.run(None, {name: x.detach().cpu().float().numpy()})]
        return outs[0] if len(outs) == 1 else outs

    return run


def fastest_cpu_runner(
    model: nn.Module, example: Tensor, *, backends: Sequence[str] = CPU_BACKENDS, iters: int = 5, warmup: int = 2,
    rtol: float = RUNTIME_RTOL,
) -> CpuRunner:
    """Time each backend on ``example`` and return a runner for the fastest one that reproduces the model.

    Args:
        model: a training- or deploy-form model (it is reparameterized into a copy first; fp32 on the CPU).
        example: an input of the shape you will run (batch size matters for the choice).
        backends: candidates from :data:`CPU_BACKENDS`; one whose package is missing is skipped with a warning.
        iters, warmup: timed and untimed calls per candidate (medians are compared).
        rtol: a candidate whose output differs from the torch deploy model by more than this (relative to the
            output scale) is rejected; default :data:`repvgg_tools.contract.RUNTIME_RTOL` (1e-4).

    Raises:
        ValueError: an unknown backend name, or no candidate left.
    """
    unknown = [b for b in backends if b not in CPU_BACKENDS]
    if unknown:
        raise ValueError(f"unknown CPU backend(s) {', '.join(unknown)}; choose from {', '.join(CPU_BACKENDS)}")
    deploy = reparameterize(copy.deepcopy(model).eval(), inplace=True)  # the caller's model keeps its mode
    with torch.inference_mode():
        reference = deploy(example)
    timings: dict[str, float] = {}
    runners: dict[str, Callable] = {}
    for backend in backends:
        try:
            if backend == "onnxruntime":
                fn = _onnxruntime_fn(deploy, example)
            else:
                channels_last = backend == "torch_channels_last"
                fn = _torch_fn(copy.deepcopy(deploy) if channels_last else deploy, channels_last)
        except ImportError as exc:
            log.warning("skipping %s: %s", backend, exc)
            continue
        _, rel = max_errors(fn(example), reference)
        if rel > rtol:
            log.warning("skipping %s: output differs from the deploy model by %.2e (relative)", backend, rel)
            continue
        timings[backend] = time_callable(lambda fn=fn: fn(example), iters, warmup)["median_ms"]
        runners[backend] = fn
    if not timings:
        raise ValueError("no CPU backend could run this model")
    best = min(timings, key=timings.get)
    log.info("fastest CPU backend: %s (%s)", best, ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items()))
    return CpuRunner(best, runners[best], timings)
