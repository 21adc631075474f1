"""The simulator: the real Engine, Scheduler and policies on a virtual clock, with a cost model in
place of the model (spec 8.2).

`SimulatedRunner` stands in for `ModelRunner`: a step of x query tokens takes the profile's
`T_fwd(x) = a*x + c`; the step's swap copies take their size over the profile's swap rate and run
beside the step, stalling it only for the part that does not fit under its compute. Every sampled
token is a dummy. Everything else (queues, blocks, budgets, waste accounting) is the code that
serves real requests, built by the same `build_engine`, so a policy measured here is the policy
that serves.
"""
from __future__ import annotations

from infercept_jax.build import build_engine
from infercept_jax.config import EngineConfig
from infercept_jax.engine import Engine
from kvcache.block_manager import BlockManager
from scheduling.output import SchedulerOutput
from scheduling.profile import HardwareProfile

DUMMY_TOKEN = 31548      # the reference simulator's sampled token (spec 1.3)


class VirtualClock:
    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SimulatedRunner:
    def __init__(self, profile: HardwareProfile, clock: VirtualClock, block_size: int):
        self.profile = profile
        self.clock = clock
        self.block_size = block_size
        self.steps = 0

    def execute(self, output: SchedulerOutput) -> tuple[list, float]:
        compute = self.profile.fwd_seconds(output.num_tokens) if output.scheduled else 0.0
        copied = (len(output.swap_out) + len(output.swap_in)) * self.block_size
        stall = max(0.0, self.profile.swap_seconds(copied) - compute) if copied else 0.0
        self.clock.advance(compute + stall)
        self.steps += 1
        sampled = [(s.request, DUMMY_TOKEN) for s in output.scheduled if s.samples]
        return sampled, stall


def simulated_engine(profile: HardwareProfile, policy: str = "infercept", *, num_device_blocks: int | None = None,
                     num_host_blocks: int | None = None, vocab_size: int = 50400, **engine_options) -> Engine:
    """An engine on a virtual clock with the profile's pools, block size and step budget S.

    `engine_options` are EngineConfig fields (the estimator defaults to the trace's oracle, as the
    released code's; 256 requests at once, contexts up to 2048 tokens, as the reference benchmark)."""
    device_blocks = num_device_blocks or profile.num_device_blocks
    host_blocks = num_host_blocks if num_host_blocks is not None else profile.num_host_blocks
    if device_blocks is None or host_blocks is None:
        raise ValueError(f"profile {profile.name!r} has no pool sizes; pass num_device_blocks and num_host_blocks")
    options = {"estimator": "oracle", "max_num_seqs": 256, "max_model_len": 2048, **engine_options}
    config = EngineConfig.from_kwargs(policy=policy, profile=profile, block_size=profile.block_size,
                                      num_kv_blocks=device_blocks, num_host_blocks=host_blocks, warmup=False,
                                      compile_cache=False, **options)
    clock = VirtualClock()

    def make_runner(blocks: BlockManager, config: EngineConfig) -> SimulatedRunner:
        return SimulatedRunner(profile, clock, config.block_size)

    return build_engine(config, make_runner, kv_bytes_per_token=profile.kv_bytes_per_token, vocab_size=vocab_size,
                        model_max_len=config.max_model_len, clock=clock)
