"""`build_engine`, the one way an engine is assembled: the step budget S has one source, the policy
owns its estimator, LAMPS's options are one nested object, and the pools follow the policy."""
from __future__ import annotations

import pytest

from helpers import HAND_PROFILE, FakeRunner, engine_with
from infercept_jax import SamplingParams
from infercept_jax.config import EngineConfig
from scheduling.lamps import LampsOptions
from scheduling.request import RequestStatus, SegmentHint


@pytest.mark.parametrize("policy", ["preserve", "infercept", "lamps"])
def test_the_profile_is_the_one_source_of_the_step_budget(policy):
    engine = engine_with(FakeRunner(), policy, profile=HAND_PROFILE, num_kv_blocks=32, num_host_blocks=8)
    assert engine.scheduler.config.max_num_batched_tokens == engine.config.max_num_batched_tokens == 12
    agreeing = engine_with(FakeRunner(), policy, profile=HAND_PROFILE, num_kv_blocks=32, num_host_blocks=8,
                           max_num_batched_tokens=12)
    assert agreeing.scheduler.config.max_num_batched_tokens == 12
    with pytest.raises(ValueError, match="max_num_batched_tokens=16 disagrees .* S is 12"):
        engine_with(FakeRunner(), policy, profile=HAND_PROFILE, num_kv_blocks=32, num_host_blocks=8,
                    max_num_batched_tokens=16)


def test_without_a_profile_the_budget_option_is_s_for_the_scheduler_and_the_policy():
    engine = engine_with(FakeRunner(), "infercept", num_kv_blocks=32, num_host_blocks=8, max_num_batched_tokens=20)
    assert engine.scheduler.config.max_num_batched_tokens == 20
    assert engine.scheduler.policy.profile.saturation_tokens == 20
    default = engine_with(FakeRunner(), "infercept", num_kv_blocks=32, num_host_blocks=8)
    assert default.scheduler.config.max_num_batched_tokens == default.scheduler.policy.profile.saturation_tokens == 384


def test_the_policy_owns_its_estimator_and_learns_when_a_call_returns():
    now = [0.0]
    engine = engine_with(FakeRunner(), "infercept", profile=HAND_PROFILE, estimator="tool-mean", num_kv_blocks=32,
                         num_host_blocks=8, clock=lambda: now[0])
    estimator = engine.scheduler.policy.estimator
    assert estimator.mean("search") == estimator.prior_s
    rid = engine.add_request([5] * 4, SamplingParams(max_tokens=4, ignore_eos=True, intercept_after=1),
                             hint=SegmentHint(tool="search"))
    while engine.requests[rid].status is not RequestStatus.PAUSED:
        engine.step()
    now[0] += 3.0
    engine.resume(rid, [7])
    assert estimator.mean("search") == 3.0


def test_lamps_options_are_one_nested_object():
    config = EngineConfig.from_kwargs(policy="lamps", lamps={"prediction_error": 0.2, "swapped_first": True})
    assert config.lamps == LampsOptions(prediction_error=0.2, swapped_first=True)
    with pytest.raises(ValueError, match="unknown LAMPS option.*'threshold'"):
        EngineConfig.from_kwargs(lamps={"threshold": 5})
    with pytest.raises(ValueError, match="lamps must be LampsOptions"):
        EngineConfig(lamps=0.2)
    engine = engine_with(FakeRunner(), "lamps", profile=HAND_PROFILE, num_kv_blocks=32, num_host_blocks=8,
                         lamps=LampsOptions(starvation_threshold=7))
    assert engine.scheduler.policy.options.starvation_threshold == 7


def test_only_policies_that_swap_get_a_host_pool():
    assert engine_with(FakeRunner(), "preserve", num_kv_blocks=32, num_host_blocks=8).blocks.host.capacity == 0
    assert engine_with(FakeRunner(), "swap", num_kv_blocks=32, num_host_blocks=8).blocks.host.capacity == 8
    # sized from swap_space_gb: 1 MiB of blocks of 4 tokens x 64 bytes
    sized = engine_with(FakeRunner(), "swap", num_kv_blocks=32, swap_space_gb=2**-10)
    assert sized.blocks.host.capacity == 2**20 // (4 * 64)
