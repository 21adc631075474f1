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


def test_the_default_estimator_is_dynamic_and_tool_mean_for_the_heuristics():
    assert engine_with(FakeRunner(), "infercept", num_kv_blocks=32, num_host_blocks=8).scheduler.policy.estimator \
        .__class__.__name__ == "DynamicEstimator"
    heuristic = engine_with(FakeRunner(), "heuristic", num_kv_blocks=32, num_host_blocks=8)
    assert heuristic.config.resolved_estimator == "tool-mean"
    assert heuristic.scheduler.policy.estimator.__class__.__name__ == "ToolMeanEstimator"
    with pytest.raises(ValueError, match="heuristic policy decides once, at the pause"):
        EngineConfig(policy="heuristic", estimator="dynamic")


def test_the_noisy_oracle_takes_its_error_and_the_engine_seed():
    engine = engine_with(FakeRunner(), "infercept", profile=HAND_PROFILE, num_kv_blocks=32, num_host_blocks=8,
                         estimator="noisy-oracle", estimator_error=0.4, seed=7)
    estimator = engine.scheduler.policy.estimator
    assert estimator.relative_error == 0.4
    same_seed = engine_with(FakeRunner(), "infercept", profile=HAND_PROFILE, num_kv_blocks=32, num_host_blocks=8,
                            estimator="noisy-oracle", estimator_error=0.4, seed=7).scheduler.policy.estimator
    other_seed = engine_with(FakeRunner(), "infercept", profile=HAND_PROFILE, num_kv_blocks=32, num_host_blocks=8,
                             estimator="noisy-oracle", estimator_error=0.4, seed=8).scheduler.policy.estimator
    draws = [[e._rng.random() for _ in range(3)] for e in (estimator, same_seed, other_seed)]
    assert draws[0] == draws[1] != draws[2]


@pytest.mark.parametrize("options, message", [
    ({"estimator": "oracle", "estimator_error": 0.2}, "estimator_error is the noisy-oracle estimator's error; "
                                                      "the estimator is 'oracle'"),
    ({"estimator_error": 0.2}, "the estimator is 'dynamic'"),
    ({"estimator": "noisy-oracle", "estimator_error": -0.1}, "finite number >= 0"),
    ({"estimator": "noisy-oracle", "estimator_error": float("nan")}, "finite number >= 0"),
])
def test_an_estimator_error_needs_the_noisy_oracle(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)


@pytest.mark.parametrize("options, message", [
    ({"num_kv_blocks": 1}, "num_kv_blocks must be None or an integer >= 2"),
    ({"num_kv_blocks": 10.5}, "num_kv_blocks"), ({"max_model_len": 40.5}, "max_model_len"),
    ({"num_host_blocks": -1}, "num_host_blocks"), ({"num_host_blocks": 2.5}, "num_host_blocks"),
    ({"seed": "x"}, "seed"), ({"swap_space_gb": "1"}, "swap_space_gb"), ({"swap_space_gb": -1}, "swap_space_gb"),
    ({"kv_cache_memory_gb": 0}, "kv_cache_memory_gb"), ({"kv_cache_memory_gb": "1"}, "kv_cache_memory_gb"),
])
def test_engine_options_of_the_wrong_type_or_range_are_refused_by_name(options, message):
    """A zero KV budget built a 2-block pool that cut every output after a token; a float block
    count or a string size raised TypeError deep in the build."""
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)
    assert EngineConfig(num_kv_blocks=2, num_host_blocks=0, max_model_len=2, swap_space_gb=0, kv_cache_memory_gb=0.5)


def test_replay_flags_reach_the_engine(monkeypatch, tmp_path):
    from infercept_jax import cli
    from infercept_jax.experiments import sweeps

    factories = []
    monkeypatch.setattr(sweeps, "run_replays", lambda trace, make_engine, *a, **k: factories.append(make_engine) or [])
    monkeypatch.setattr(sweeps, "format_table", lambda results: "")
    monkeypatch.setattr(sweeps, "write_results", lambda results, out: [])
    assert cli.main(["replay", "--trace", "builtin:mixed-small", "--simulate", "--profile", "a100-gptj-6b",
                     "--policy", "heuristic", "--heuristic", "H-S", "--estimator", "noisy-oracle",
                     "--estimator-error", "0.3", "--max-model-len", "1024", "--out", str(tmp_path)]) == 0
    engine = factories[0]("heuristic")
    assert engine.config.max_model_len == 1024 and engine.config.heuristic == "H-S"
    assert engine.scheduler.policy.estimator.relative_error == 0.3
    assert (engine.scheduler.policy.swap_from, engine.scheduler.policy.discard_from) == (4.0, None)
    assert cli.main(["replay", "--trace", "builtin:mixed-small", "--simulate", "--profile", "a100-gptj-6b",
                     "--max-num-batched-tokens", "100", "--out", str(tmp_path)]) == 0
    with pytest.raises(ValueError, match="max_num_batched_tokens=100 disagrees"):      # S is the profile's
        factories[1]("infercept")
    assert cli.main(["replay", "--trace", "builtin:mixed-small", "--simulate", "--profile", "a100-gptj-6b",
                     "--dtype", "bfloat16", "--out", str(tmp_path)]) == 2
    assert cli.main(["replay", "--trace", "builtin:mixed-small", "--simulate", "--profile", "a100-gptj-6b",
                     "--device-memory-gb", "40", "--out", str(tmp_path)]) == 0
    assert factories[2]("discard").scheduler.blocks.device.num_blocks == 836   # 40 GiB per GPU (spec 6.6)
    for wrong in (["--num-kv-blocks", "100"], ["--device-memory-gb", "14"]):  # two pool sizes; no room for KV
        assert cli.main(["replay", "--trace", "builtin:mixed-small", "--simulate", "--profile", "a100-gptj-6b",
                         "--device-memory-gb", "40", *wrong, "--out", str(tmp_path)]) == 2
    assert cli.main(["replay", "--trace", "builtin:mixed-small", "--device-memory-gb", "40",   # the real engine
                     "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("max_model_len, warned", [(512, False), (513, True), (None, False)])
def test_a_context_longer_than_the_models_positions_is_warned_about(caplog, max_model_len, warned):
    from infercept_jax.build import build_engine

    config = EngineConfig.from_kwargs(num_kv_blocks=64, max_model_len=max_model_len, warmup=False, compile_cache=False)
    with caplog.at_level("WARNING", logger="infercept_jax.build"):
        engine = build_engine(config, lambda *_: FakeRunner(), kv_bytes_per_token=64, vocab_size=64, model_max_len=512)
    assert engine.config.max_model_len == (max_model_len or 512)
    assert ("trained on" in caplog.text) == warned
