"""Latency of a callable (wall clock on the CPU, CUDA events on a GPU) and FLOPs of a model: the timers and the
counter shared by the demo, the CPU benchmark and the GPU report."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["time_callable", "time_cuda", "time_on", "count_flops"]


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "min_ms": times[0]}


def time_callable(fn: Callable[[], object], iters: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median, p90 and min latency of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    Args:
        fn: the work to time (synchronous: on a GPU, synchronize inside ``fn`` or use :func:`time_cuda`).
        iters: timed calls (>= 1).
        warmup: untimed calls first (allocator, caches, lazy initialization).
    """
    if iters < 1:
        raise ValueError("iters must be at least 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _summary(times)


def time_cuda(fn: Callable[[], object], iters: int = 30, warmup: int = 5) -> dict[str, float]:
    """Like :func:`time_callable` for GPU work: each call is timed with a pair of CUDA events on the current stream.

    The device is synchronized after the warm-up, so queued warm-up work is not charged to the first timed call.

    Args:
        fn: the work to time; it enqueues CUDA kernels on the current stream (no synchronization needed).
        iters: timed calls (>= 1).
        warmup: untimed calls first (cuDNN autotuning with ``cudnn.benchmark``, allocator, lazy initialization).
    """
    import torch

    if iters < 1:
        raise ValueError("iters must be at least 1")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return _summary(times)


def time_on(device: Any, fn: Callable[[], object], iters: int = 30, warmup: int = 5) -> dict[str, float]:
    """:func:`time_cuda` when ``device`` (a ``torch.device`` or a string) is CUDA, else :func:`time_callable`."""
    kind = device if isinstance(device, str) else device.type
    timer = time_cuda if str(kind).startswith("cuda") else time_callable
    return timer(fn, iters, warmup)


def count_flops(model: Any, size: int, in_chans: int = 3) -> int:
    """FLOPs (2 x multiply-adds) of one ``size x size`` image, counted by ``torch.utils.flop_counter``.

    The input is made on the device of the model's first parameter, so a model built under ``torch.device("meta")``
    is counted without allocating or computing anything. Convolutions and matrix products are counted; BatchNorm,
    additions and activations are not.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, in_chans, size, size, device=device))
    return counter.get_total_flops()
