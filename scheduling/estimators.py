"""How long a paused request's tool call still runs: T_INT of preserve waste (spec 3.5.1 item 6).

The released code reads the trace's true duration (an oracle); the paper also describes a dynamic
estimate that needs no knowledge of the call. Both are here, with a noisy oracle and a per-tool
running mean in between, so the policy's sensitivity to estimate quality can be measured.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any

from scheduling.request import Interception


class DurationEstimator(ABC):
    @abstractmethod
    def remaining(self, call: Interception, now: float) -> float:
        """Seconds the call is expected to run after `now`, never negative."""

    def observe(self, call: Interception) -> None:
        """Learn from a call that ended (its `end_time` is set). Most estimators need nothing."""


class OracleEstimator(DurationEstimator):
    """The trace's true duration, as the released code uses it, clamped at 0 once it overruns.

    A call without an expected duration counts as already over, so it never looks worth keeping.
    """

    def remaining(self, call: Interception, now: float) -> float:
        if call.expected_duration is None:
            return 0.0
        return max(0.0, call.expected_duration - (now - call.start_time))


class NoisyOracleEstimator(DurationEstimator):
    """The oracle off by a factor from uniform [1-e, 1+e], drawn once per call so that the
    estimate of one call stays consistent from step to step."""

    def __init__(self, relative_error: float, seed: int = 0):
        if relative_error < 0:
            raise ValueError(f"relative_error must be >= 0, got {relative_error}")
        self.relative_error = relative_error
        self._rng = random.Random(seed)
        self._factors: dict[tuple[str, int], float] = {}

    def factor(self, call: Interception) -> float:
        if call.key not in self._factors:
            e = self.relative_error
            self._factors[call.key] = max(0.0, self._rng.uniform(1 - e, 1 + e))
        return self._factors[call.key]

    def remaining(self, call: Interception, now: float) -> float:
        if call.expected_duration is None:
            return 0.0
        return max(0.0, call.expected_duration * self.factor(call) - (now - call.start_time))

    def observe(self, call: Interception) -> None:
        self._factors.pop(call.key, None)   # the call is over; keep the cache bounded


class ToolMeanEstimator(DurationEstimator):
    """The running mean of the tool's past durations (`prior_s` for a tool not seen yet): the
    paper profiles short automated tools offline, whose durations vary little."""

    def __init__(self, prior_s: float = 1.0):
        self.prior_s = prior_s
        self._count: dict[str | None, int] = {}
        self._total: dict[str | None, float] = {}

    def mean(self, tool: str | None) -> float:
        if tool not in self._count:
            return self.prior_s
        return self._total[tool] / self._count[tool]

    def remaining(self, call: Interception, now: float) -> float:
        return max(0.0, self.mean(call.tool) - (now - call.start_time))

    def observe(self, call: Interception) -> None:
        duration = call.duration
        if duration is None:
            raise ValueError(f"call {call.key} has not ended")
        self._count[call.tool] = self._count.get(call.tool, 0) + 1
        self._total[call.tool] = self._total.get(call.tool, 0.0) + duration


class DynamicEstimator(DurationEstimator):
    """The paper's dynamic estimate: a call that has run t seconds is expected to run t more."""

    def remaining(self, call: Interception, now: float) -> float:
        return max(0.0, now - call.start_time)


_ESTIMATOR_CLASSES: dict[str, type[DurationEstimator]] = {
    "oracle": OracleEstimator,
    "noisy-oracle": NoisyOracleEstimator,
    "tool-mean": ToolMeanEstimator,
    "dynamic": DynamicEstimator,
}
ESTIMATORS = tuple(_ESTIMATOR_CLASSES)


def make_estimator(name: str, **kwargs: Any) -> DurationEstimator:
    """An estimator by its command-line name; `kwargs` go to its constructor."""
    if name not in _ESTIMATOR_CLASSES:
        raise ValueError(f"unknown duration estimator {name!r}; choose one of {list(ESTIMATORS)}")
    return _ESTIMATOR_CLASSES[name](**kwargs)
