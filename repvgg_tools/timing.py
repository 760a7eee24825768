"""Wall-clock latency of a callable, the one timer used by the demo and the benchmark."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["time_callable"]


def time_callable(fn: Callable[[], object], iters: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median, p90 and min latency of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    Args:
        fn: the work to time (synchronous: on a GPU, synchronize inside ``fn``).
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
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "min_ms": times[0]}
