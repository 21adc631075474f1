"""Tool-call duration estimators."""
from __future__ import annotations

import random

import pytest

from scheduling.estimators import (ESTIMATORS, DynamicEstimator, NoisyOracleEstimator,
                                   OracleEstimator, ToolMeanEstimator, make_estimator)
from scheduling.request import Interception


def call(i: int = 0, tool: str | None = "search", expected: float | None = 3.0,
         start: float = 10.0) -> Interception:
    return Interception(key=("r", i), start_time=start, tool=tool, expected_duration=expected)


def test_oracle():
    est = OracleEstimator()
    assert est.remaining(call(), now=11.0) == pytest.approx(2.0)   # 3 - (11 - 10)
    assert est.remaining(call(), now=14.0) == 0.0                  # overran: 3 - 4 clamped
    assert est.remaining(call(expected=None), now=11.0) == 0.0


def test_noisy_oracle_factor_fixed_per_call_and_seeded():
    est = NoisyOracleEstimator(relative_error=0.5, seed=7)
    c = call()
    first = est.remaining(c, now=11.0)
    f = est.factor(c)
    # the first draw of random.Random(7) over [0.5, 1.5]
    assert f == random.Random(7).uniform(0.5, 1.5)
    assert 0.5 <= f <= 1.5
    assert first == pytest.approx(max(0.0, 3.0 * f - 1.0))
    assert est.factor(c) == f
    assert est.remaining(c, now=11.5) == pytest.approx(max(0.0, 3.0 * f - 1.5))
    assert est.remaining(c, now=100.0) == 0.0
    assert est.remaining(call(expected=None), now=11.0) == 0.0


def test_noisy_oracle_default_seed_and_a_fresh_draw_after_the_call_ends():
    est = NoisyOracleEstimator(relative_error=0.5)
    draws = random.Random(0)                                        # the default seed is 0
    c = call()
    assert est.factor(c) == draws.uniform(0.5, 1.5)
    est.observe(call(1))                                            # a call it never saw: no error
    est.observe(c)                                                  # forgets c's factor ...
    assert est.factor(c) == draws.uniform(0.5, 1.5)                 # ... so the next one is a new draw


def test_noisy_oracle_bounds_and_clamping():
    est = NoisyOracleEstimator(relative_error=2.0, seed=0)   # factors from [-1, 3], clamped at 0
    factors = [est.factor(call(i)) for i in range(200)]
    assert all(0.0 <= f <= 3.0 for f in factors)
    assert 0.0 in factors and len(set(factors)) > 100
    assert NoisyOracleEstimator(0.0).remaining(call(), now=11.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        NoisyOracleEstimator(-0.1)


def test_tool_mean_updates():
    assert ToolMeanEstimator().mean("search") == 1.0                # the default prior
    est = ToolMeanEstimator(prior_s=2.0)
    assert est.remaining(call(), now=10.5) == pytest.approx(1.5)   # prior 2 - 0.5
    for i, duration in enumerate([4.0, 6.0]):
        done = call(i)
        done.end_time = done.start_time + duration
        est.observe(done)
    assert est.mean("search") == pytest.approx(5.0)                # (4 + 6)/2
    assert est.remaining(call(5), now=11.0) == pytest.approx(4.0)  # 5 - 1
    assert est.remaining(call(5), now=16.0) == 0.0                 # 5 - 6 clamped
    assert est.remaining(call(5, tool="calc"), now=11.0) == pytest.approx(1.0)   # unseen: 2 - 1
    with pytest.raises(ValueError):
        est.observe(call(6))                                       # not ended


def test_dynamic():
    est = DynamicEstimator()
    assert est.remaining(call(), now=13.0) == pytest.approx(3.0)   # ran 3 s, expect 3 more
    assert est.remaining(call(), now=9.0) == 0.0                   # clock before start: clamped


def test_make_estimator():
    assert ESTIMATORS == ("oracle", "noisy-oracle", "tool-mean", "dynamic")
    assert isinstance(make_estimator("oracle"), OracleEstimator)
    noisy = make_estimator("noisy-oracle", relative_error=0.1, seed=3)
    assert isinstance(noisy, NoisyOracleEstimator) and noisy.relative_error == 0.1
    assert make_estimator("tool-mean", prior_s=4.0).mean("x") == 4.0
    assert isinstance(make_estimator("dynamic"), DynamicEstimator)
    with pytest.raises(ValueError, match="noisy-oracle"):
        make_estimator("psychic")
