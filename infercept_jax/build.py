"""`build_engine`: the one way to assemble an engine, for the model (`LLM`) and for the simulator
alike. The same config gives the same profile, step budget S, policy and pools; only the runner
and the clock differ."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

from infercept_jax.config import EngineConfig
from infercept_jax.engine import Engine, Runner
from kvcache.block_manager import BlockManager
from scheduling.estimators import make_estimator
from scheduling.policies import make_policy
from scheduling.profile import HardwareProfile, load_profile
from scheduling.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 384      # S without a profile: InferCept's saturation point on an A100
# S without a profile, per backend: a CPU saturates near InferCept's A100 budget; an H200 ran a
# 384-token step of a 1.7B model in about the time of a 16-token one, so accelerators start higher
# (profile the machine for its own knee: `infercept profile` sweeps every bucket up to this).
DEFAULT_TOKEN_BUDGETS = {"cpu": DEFAULT_TOKEN_BUDGET, "gpu": 2048, "tpu": 2048}
_warned_uncalibrated = False    # the missing-profile warning is given once per process


def build_engine(config: EngineConfig, make_runner: Callable[[BlockManager, EngineConfig], Runner], *,
                 kv_bytes_per_token: int, vocab_size: int, model_max_len: int, eos_token_ids=(),
                 tokenizer=None, clock: Callable[[], float] = time.monotonic) -> Engine:
    """An engine for `config`: its profile fixes the step budget S, its policy gets its estimator,
    its pools are sized in blocks of `kv_bytes_per_token * block_size` bytes (split over
    `tensor_parallel_size` devices; the memory options are per device), and
    `make_runner(block_manager, resolved config)` makes the runner. The resolved config has
    `max_model_len` (the config's, else `model_max_len`) and `max_num_batched_tokens` (S) set."""
    profile = engine_profile(config, kv_bytes_per_token)
    if config.max_model_len is not None and config.max_model_len > model_max_len:
        log.warning("max_model_len %d is longer than the %d positions the model was trained on: RoPE "
                    "goes on, but outputs past %d may be poor (vLLM refuses this by default)",
                    config.max_model_len, model_max_len, model_max_len)
    config = dataclasses.replace(config, max_model_len=config.max_model_len or model_max_len,
                                 max_num_batched_tokens=profile.saturation_tokens)
    noise = {"relative_error": config.estimator_error, "seed": config.seed}
    estimator = make_estimator(config.resolved_estimator, **(noise if config.estimator == "noisy-oracle" else {}))
    policy = make_policy(config.policy, profile, estimator, config.heuristic, config.lamps, config.seed)
    bytes_per_block = kv_bytes_per_token * config.block_size // config.tensor_parallel_size
    num_blocks = config.num_kv_blocks
    if num_blocks is None:
        num_blocks = max(2, int(config.kv_cache_memory_gb * 2**30) // bytes_per_block)
    num_host_blocks = 0
    if policy.uses_host_pool:
        num_host_blocks = config.num_host_blocks
        if num_host_blocks is None:
            num_host_blocks = int(config.swap_space_gb * 2**30) // bytes_per_block
    blocks = BlockManager(num_blocks, config.block_size, num_host_blocks)
    scheduler = Scheduler(SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs), blocks, policy)
    return Engine(make_runner(blocks, config), scheduler, config, vocab_size=vocab_size,
                  eos_token_ids=eos_token_ids, tokenizer=tokenizer, clock=clock)


def engine_profile(config: EngineConfig, kv_bytes_per_token: int) -> HardwareProfile:
    """The profile the policy decides with, and the one source of the step budget S.

    Without a profile, the constants are uncalibrated and S is `max_num_batched_tokens` (384 if
    unset). With one, S is its saturation point, and a `max_num_batched_tokens` that disagrees is
    refused: the policy's waste model and the scheduler must agree on S.
    """
    if isinstance(config.profile, HardwareProfile):
        profile = config.profile
    elif config.profile is not None:
        profile = load_profile(config.profile)
    else:
        global _warned_uncalibrated
        if config.policy in ("infercept", "lamps") and not _warned_uncalibrated:
            _warned_uncalibrated = True
            log.warning(f"no hardware profile given: the {config.policy} policy uses uncalibrated constants; "
                        "run `infercept profile` on this machine and pass profile=<the JSON file>")
        budget = config.max_num_batched_tokens or DEFAULT_TOKEN_BUDGET
        return HardwareProfile(
            name="uncalibrated", fwd_ms_per_token=0.0463, fwd_base_ms=10.0, saturation_tokens=budget,
            swap_limit_tokens=budget, kv_bytes_per_token=kv_bytes_per_token, block_size=config.block_size)
    if config.max_num_batched_tokens not in (None, profile.saturation_tokens):
        raise ValueError(f"max_num_batched_tokens={config.max_num_batched_tokens} disagrees with the profile "
                         f"{profile.name!r}, whose step budget S is {profile.saturation_tokens}: leave "
                         "max_num_batched_tokens unset (the profile's S is used) or profile with that budget")
    return profile
