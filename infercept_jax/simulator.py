"""The simulator: the real Engine, Scheduler and policies on a virtual clock, with a cost model in
place of the model (spec 8.2).

`SimulatedRunner` stands in for `ModelRunner`: a step of x query tokens takes the profile's
`T_fwd(x) = a*x + c`; the step's swap copies take their size over the profile's swap rate and run
beside the step, stalling it only for the part that does not fit under its compute. Every sampled
token is a dummy. Everything else (queues, blocks, budgets, waste accounting) is the code that
serves real requests, so a policy measured here is the policy that serves.
"""
from __future__ import annotations

from infercept_jax.engine import Engine
from kvcache.block_manager import BlockManager
from scheduling.estimators import DurationEstimator
from scheduling.policies import Policy
from scheduling.profile import HardwareProfile
from scheduling.scheduler import SchedulerOutput

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


def simulated_engine(profile: HardwareProfile, policy: Policy, estimator: DurationEstimator, *,
                     max_model_len: int = 2048, max_num_seqs: int = 256, num_device_blocks: int | None = None,
                     num_host_blocks: int | None = None, vocab_size: int = 50400) -> Engine:
    """An Engine on a virtual clock with the profile's pools and token budget S."""
    device_blocks = num_device_blocks or profile.num_device_blocks
    host_blocks = num_host_blocks if num_host_blocks is not None else profile.num_host_blocks
    if device_blocks is None or host_blocks is None:
        raise ValueError(f"profile {profile.name!r} has no pool sizes; pass num_device_blocks and num_host_blocks")
    clock = VirtualClock()
    blocks = BlockManager(device_blocks, profile.block_size, host_blocks if policy.uses_host_pool else 0)
    runner = SimulatedRunner(profile, clock, profile.block_size)
    return Engine(runner, blocks, max_model_len=max_model_len, vocab_size=vocab_size, eos_token_ids=(),
                  max_num_seqs=max_num_seqs, max_num_batched_tokens=profile.saturation_tokens,
                  policy=policy, estimator=estimator, clock=clock)
