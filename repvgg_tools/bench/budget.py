"""A wall-clock budget for a run made of measured tasks: run them cheap first, estimate the rest, drop what won't fit.

Each :class:`Task` states the work it does (e.g. FLOPs x images: one unit for all tasks) and a cost group (tasks
whose seconds per unit of work are alike, e.g. "throughput fp16 deploy"; the group's first word is its kind, e.g.
"throughput"). Before a task runs, its cost is estimated from the seconds per unit of work last measured in its group;
before any task of its group ran, from its ``prior_s``, else from the slowest rate measured in a group of its kind,
else in any group (a conservative guess). Only the very first task runs without an estimate. A task whose estimate
does not fit in the time left is dropped and recorded with the figures that dropped it. A task may need a
:class:`Setup` (e.g. building a model) shared with other tasks: it runs once, before the first task that needs it,
and is estimated the same way from the setups measured before it (per unit of its own work, e.g. parameters).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..io.errors import one_line

__all__ = ["Setup", "Task", "TimeBudget"]

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Shared preparation of several tasks. ``work`` sizes it (e.g. parameters to build); ``fn`` returns a value."""

    key: str
    work: float
    fn: Callable[[], Any]
    group: str = "setup"


@dataclass
class Task:
    """One measured row: ``fn(setup_value)`` (or ``fn()`` without a setup) returns its result."""

    key: str
    group: str
    work: float
    fn: Callable[..., Any]
    setup: Setup | None = None
    prior_s: float | None = None


@dataclass
class TimeBudget:
    """Runs tasks within ``seconds`` of wall-clock time counted from ``start`` (default: now), keeping the last
    ``reserve_s`` seconds free (for writing the results).

    Attributes:
        done: ``{"key", "group", "seconds", "estimate_s"}`` of every task that ran, in order.
        dropped: ``{"key", "group", "estimate_s", "left_s", "reason"}`` of every task that was not run.
        setups: ``{"key", "seconds"}`` of every setup that ran.
    """

    seconds: float
    start: float | None = None
    reserve_s: float = 0.0
    clock: Callable[[], float] = time.perf_counter
    done: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    setups: list[dict] = field(default_factory=list)
    _rates: dict[str, float] = field(default_factory=dict)
    _setup_rates: dict[str, float] = field(default_factory=dict)
    _values: dict[str, Any] = field(default_factory=dict)
    _failed: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seconds <= 0 or not 0 <= self.reserve_s < self.seconds:
            raise ValueError(f"the budget must be positive and exceed the reserve, not {self.seconds} "
                             f"(reserve {self.reserve_s})")
        if self.start is None:
            self.start = self.clock()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds left for tasks (negative once overrun)."""
        return self.seconds - self.reserve_s - self.elapsed()

    def _estimate(self, group: str, work: float, prior_s: float | None, rates: dict[str, float]) -> float | None:
        rate = rates.get(group)
        if rate is not None:
            return rate * work
        if prior_s is not None:
            return prior_s
        kind = _kind(group)  # borrow the slowest measured rate of the same kind, else of any kind
        same = [r for g, r in rates.items() if _kind(g) == kind]
        borrowed = same or list(rates.values())
        return max(borrowed) * work if borrowed else None

    def estimate(self, task: Task) -> float | None:
        """Estimated seconds of ``task`` including its setup if that has not run; None when nothing is known yet."""
        est = self._estimate(task.group, task.work, task.prior_s, self._rates)
        setup = task.setup
        if setup is not None and setup.key not in self._values and setup.key not in self._failed:
            setup_est = self._estimate(setup.group, setup.work, None, self._setup_rates)
            if setup_est is not None:
                est = (est or 0.0) + setup_est
        return est

    def _learn(self, rates: dict[str, float], group: str, seconds: float, work: float) -> None:
        if work > 0:
            rates[group] = seconds / work

    def run(self, task: Task) -> tuple[bool, Any]:
        """Run ``task`` if its estimate fits in the time left.

        Returns:
            ``(True, result)`` when it ran (an exception from ``fn`` propagates after the time is recorded),
            ``(False, reason)`` when it was dropped.

        Raises:
            RuntimeError: its setup failed before (the setup's own exception propagates the first time).
        """
        left, est = self.left(), self.estimate(task)
        reason = None
        if left <= 0:
            reason = f"no time left ({self.elapsed():.1f} s of {self.seconds:g} s used, {self.reserve_s:g} s kept)"
        elif est is not None and est > left:
            reason = f"estimated {est:.1f} s, {left:.1f} s left"
        if task.setup is not None and task.setup.key in self._failed:
            raise RuntimeError(f"{task.setup.key} failed: {self._failed[task.setup.key]}")
        if reason is not None:
            self.dropped.append({"key": task.key, "group": task.group, "estimate_s": est, "left_s": left,
                                 "reason": reason})
            log.info("dropped %s: %s", task.key, reason)
            return False, reason
        args = ()
        if task.setup is not None:
            args = (self._setup(task.setup),)
        t0 = self.clock()
        try:
            return True, task.fn(*args)
        finally:
            seconds = self.clock() - t0
            self._learn(self._rates, task.group, seconds, task.work)
            self.done.append({"key": task.key, "group": task.group, "seconds": seconds, "estimate_s": est})

    def _setup(self, setup: Setup) -> Any:
        if setup.key in self._values:
            return self._values[setup.key]
        t0 = self.clock()
        try:
            value = setup.fn()
        except Exception as exc:
            self._failed[setup.key] = one_line(exc)
            raise
        finally:
            seconds = self.clock() - t0
            self._learn(self._setup_rates, setup.group, seconds, setup.work)
            self.setups.append({"key": setup.key, "seconds": seconds})
        self._values[setup.key] = value
        return value

    def release(self, keys: Iterable[str]) -> None:
        """Forget the values of these setups (to free memory); a task that needs one again rebuilds it."""
        for key in keys:
            self._values.pop(key, None)


def _kind(group: str) -> str:
    return group.split(" ", 1)[0]
