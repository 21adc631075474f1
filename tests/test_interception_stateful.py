"""The engine under a random mix of arrivals, steps, pauses, resumes and aborts on tiny pools.

A fake runner stands in for the model (the scheduler, block manager and engine are the real ones),
so hypothesis can run thousands of steps in seconds. Every policy must keep both pools leak-free,
keep each request in exactly the queue its status says, finish or abort every request, compute
every request on its own KV only (through swaps, discards, preemptions and full pools), and leave
nothing held in the host pool once all requests are done.
"""
from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from helpers import FakeRunner, engine_with
from infercept_jax import SamplingParams
from kvcache.block_manager import BlockManager
from scheduling.lamps import LampsOptions
from scheduling.policies import POLICIES, make_policy
from scheduling.profile import HardwareProfile
from scheduling.request import PauseMode, Request, RequestStatus, SegmentHint
from scheduling.scheduler import Scheduler, SchedulerConfig

PROFILE = HardwareProfile(name="tiny", fwd_ms_per_token=20.0, fwd_base_ms=100.0, saturation_tokens=12,
                          swap_limit_tokens=20.0, kv_bytes_per_token=64, block_size=4)


class ContentRunner(FakeRunner):
    """Moves tags where the model's runner moves KV: each block holds (request, logical block) of
    the tokens computed into it, the step's swap copies move tags between the device and the host
    in the runner's order, and a host block keeps its tag until a swap-out overwrites it or the
    step's `host_freed` lets go of it, as the pinned host pool keeps its arrays."""

    def __init__(self):
        self.blocks: BlockManager | None = None     # the engine's, set once it is built
        self.device: dict[int, tuple[str, int]] = {}
        self.host: dict[int, tuple[str, int]] = {}

    def execute(self, output):
        started = [(h, self.device.get(d)) for d, h in output.swap_out]
        for h, d in output.swap_in:
            assert h in self.host, f"host block {h} is swapped in but holds nothing"
            self.device[d] = self.host[h]
        size = self.blocks.block_size
        for item in output.scheduled:
            rid, computed = item.request.request_id, item.request.num_computed_tokens
            table = self.blocks.tables[rid]
            for i in range(-(-computed // size)):
                assert self.device.get(table[i]) == (rid, i), f"{rid} would read the wrong KV in its block {i}"
            for i in range(computed // size, -(-(computed + item.num_query_tokens) // size)):
                self.device[table[i]] = (rid, i)
        self.host.update(started)
        for h in output.host_freed:
            del self.host[h]
        return super().execute(output)

    def launch(self, output):
        """Under async scheduling: the step's KV moves when it is launched, as on the device."""
        return self.execute(output)

    def collect(self, launched):
        return launched


class EngineMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(POLICIES), device_blocks=st.integers(6, 20), host_blocks=st.integers(2, 12),
                threshold=st.integers(1, 6), rerank=st.integers(1, 3), error=st.sampled_from([0.0, 0.6]),
                swapped_first=st.booleans(), overlap=st.booleans())
    def build(self, policy, device_blocks, host_blocks, threshold, rerank, error, swapped_first, overlap):
        self.now = 0.0
        # LAMPS with a short starvation threshold and quantum, so the queue jumps happen here too.
        lamps = LampsOptions(prediction_error=error, starvation_threshold=threshold, starvation_quantum=3,
                             rerank_interval=rerank, swapped_first=swapped_first)
        self.runner = ContentRunner()
        self.engine = engine_with(self.runner, policy, profile=PROFILE, estimator="oracle", lamps=lamps,
                                  num_kv_blocks=device_blocks, num_host_blocks=host_blocks, max_model_len=48,
                                  max_num_seqs=4, clock=lambda: self.now, async_scheduling=overlap)
        self.blocks = self.runner.blocks = self.engine.blocks
        self.live: set[str] = set()

    def paused(self) -> list[str]:
        return sorted(rid for rid in self.live if self.engine.requests[rid].status is RequestStatus.PAUSED)

    @rule(prompt_len=st.integers(1, 20), max_tokens=st.integers(1, 16), every=st.none() | st.integers(1, 5),
          duration=st.floats(0, 5))
    def add(self, prompt_len, max_tokens, every, duration):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, intercept_after=every)
        try:
            self.live.add(self.engine.add_request([5] * prompt_len, params, hint=SegmentHint(call_duration=duration)))
        except ValueError as error:       # a prompt the tiny pool cannot hold is refused up front
            assert "KV blocks" in str(error)

    @rule(ticks=st.integers(1, 4))
    def step(self, ticks):
        for _ in range(ticks):
            self.now += 0.5
            for out in self.engine.step():
                if out.finished:
                    self.live.discard(out.request_id)

    @precondition(lambda self: self.paused())
    @rule(data=st.data(), result_len=st.integers(0, 12))
    def resume(self, data, result_len):
        rid = data.draw(st.sampled_from(self.paused()))
        if self.engine.resume(rid, [7] * result_len).finished:
            self.live.discard(rid)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.engine.abort(rid)
        self.live.discard(rid)

    @invariant()
    def pools_and_queues_are_consistent(self):
        if not hasattr(self, "engine"):
            return
        self.blocks.check_invariants()
        sched = self.engine.scheduler
        queues = {RequestStatus.RUNNING: sched.running, RequestStatus.WAITING: sched.waiting,
                  RequestStatus.SWAPPED: sched.swapped, RequestStatus.PAUSED: list(sched.paused.values())}
        placed = [r.request_id for q in queues.values() for r in q]
        assert sorted(placed) == sorted(self.live), "a request is lost or in two queues"
        for status, queue in queues.items():
            assert all(r.status is status for r in queue)
        for r in sched.running + sched.waiting:
            assert self.blocks.num_host_blocks_of(r.request_id) == 0
        for r in sched.waiting:
            assert self.blocks.num_blocks_of(r.request_id) == 0
        for r in sched.paused.values():
            if r.num_computed_tokens == 0:          # nothing computed, nothing held (async scheduling's take-back)
                assert self.blocks.num_blocks_of(r.request_id) == 0
            if r.pause_mode is PauseMode.DISCARD:
                assert self.blocks.num_blocks_of(r.request_id) == self.blocks.num_host_blocks_of(r.request_id) == 0
        plans = getattr(sched.policy, "plans", None)
        if plans is not None:
            assert sorted(plans) == sorted(self.live), "LAMPS keeps a plan for exactly the live requests"

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        for _ in range(2000):
            if not self.live and not self.engine.has_work():    # (under async scheduling, a step in flight)
                break
            for rid in self.paused():
                if self.engine.resume(rid, [7, 7]).finished:
                    self.live.discard(rid)
            self.now += 0.5
            for out in self.engine.step():
                if out.finished:
                    self.live.discard(out.request_id)
        assert not self.live, f"requests never finished: {sorted(self.live)}"
        assert self.blocks.num_free == self.blocks.device.capacity
        assert self.blocks.host.num_free == self.blocks.host.capacity
        # Host blocks freed after the last step (an abort) are let go of with the next step.
        self.engine.add_request([5], SamplingParams(max_tokens=1))
        while self.engine.has_unfinished():
            self.engine.step()
        assert self.runner.host == {}, "the host pool still holds blocks no request owns"


EngineMachine.TestCase.settings = settings(stateful_step_count=40, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestEngineUnderRandomInterceptions = EngineMachine.TestCase


# ------------------------------------------------------------------ liveness cases hypothesis found
def _swapped(sched: Scheduler, rid: str, prompt: int, on_host: int, arrival: float) -> Request:
    """A resumed request with `prompt` tokens of KV, `on_host` blocks of it in the host pool."""
    request = Request(rid, [5] * prompt, SamplingParams(max_tokens=4), arrival)
    sched.blocks.ensure(rid, prompt)
    request.num_computed_tokens = prompt
    sched.blocks.swap_out(rid, on_host)
    request.status = RequestStatus.SWAPPED
    sched.swapped.append(request)
    return request


def test_partly_swapped_requests_filling_the_device_do_not_wait_forever():
    """Budgeted swaps left two resumed requests each partly on the device, the device full and
    nothing running (found by CI): the newer one is recomputed so the older can come back."""
    sched = Scheduler(SchedulerConfig(12, 4), BlockManager(6, 4, num_host_blocks=3),
                      make_policy("infercept", PROFILE))
    old = _swapped(sched, "old", 12, on_host=2, arrival=0.0)
    new = _swapped(sched, "new", 16, on_host=1, arrival=1.0)
    sched.blocks.swap_in("old", 1)      # the block the newer one's swap-out freed
    assert sched.blocks.num_free == 0 and sched.blocks.num_host_blocks_of("old") == 1
    out = sched.schedule()
    assert old.status is RequestStatus.RUNNING and [s.request for s in out.scheduled] == [old]
    assert new.status is RequestStatus.WAITING and out.preempted == [new]
    assert sched.blocks.num_blocks_of("new") == sched.blocks.num_host_blocks_of("new") == 0


def test_a_zero_swap_in_budget_with_nothing_running_still_brings_a_request_back():
    """N(S) < S and little free memory give a swap-in budget of 0 blocks; with no batch running
    nothing would ever free memory, so at least one block comes in per step."""
    slow_copies = dataclasses.replace(PROFILE, swap_limit_tokens=4.0)
    sched = Scheduler(SchedulerConfig(12, 4), BlockManager(6, 4, num_host_blocks=6),
                      make_policy("infercept", slow_copies))
    request = _swapped(sched, "old", 20, on_host=1, arrival=0.0)   # copying 4 tokens beats recomputing 20
    assert sched.policy.swap_budget()[0] == 0
    out = sched.schedule()
    assert len(out.swap_in) == 1 and [s.request for s in out.scheduled] == [request]
    assert request.status is RequestStatus.RUNNING and sched.blocks.num_blocks_of("old") == 5
