"""Decisions, not formulas: which mode InferCept and the heuristics pick, which paused request gives
up memory first, which running request is preempted, who takes the step budget first, where a
resumed discarded request queues, and from which end the block manager moves blocks (spec 2.1,
2.3, 3). Each test is built so that inverting or shifting its rule makes it fail. Milliseconds, on
the real scheduler and policies without a model."""
from __future__ import annotations

import pytest

from helpers import HAND_PROFILE, FakeRunner, engine_with, scheduler_with
from infercept_jax import SamplingParams
from kvcache.block_manager import BlockManager
from scheduling.estimators import OracleEstimator
from scheduling.infercept import InferCeptPolicy
from scheduling.policies import (POLICIES, DiscardPolicy, HeuristicPolicy, ImprovedDiscardPolicy, PreservePolicy,
                                 make_policy)
from scheduling.request import Interception, PauseMode, Request, RequestStatus, SegmentHint
from scheduling.scheduler import Scheduler

# T_fwd(x) = (x + 10) ms, S = 12, N(S) = 24 tokens. With no running batch a chunked discard of C
# tokens recomputes in chunks of c_h = 12: w_d = 0.022 * 12 * n(n+1)/2 + 0.001 * last**2 with
# n = C // 12, last = C % 12, so w_d(8) = 0.064, w_d(16) = 0.264 + 0.016 = 0.28, w_d(24) = 0.792
# (HAND_PROFILE of helpers.py).


def running(sched: Scheduler, rid: str, computed: int, inflight: int = 1, arrival: float = 0.0) -> Request:
    """A running request holding `computed` tokens of KV with `inflight` tokens still to compute."""
    request = Request(rid, [5] * (computed + inflight), SamplingParams(max_tokens=8), arrival)
    request.num_computed_tokens = computed
    sched.blocks.ensure(rid, computed)
    request.status = RequestStatus.RUNNING
    sched.running.append(request)
    return request


def paused(sched: Scheduler, rid: str, tokens: int, call_s: float, arrival: float = 0.0, start: float = 0.0) -> Request:
    """A request with `tokens` of KV on the device, paused at `start` on a call of `call_s` seconds
    (the oracle duration)."""
    request = running(sched, rid, tokens, 0, arrival)
    sched.pause(request, Interception((rid, 0), start, expected_duration=call_s), start)
    return request


def with_swap_out_budget(policy, blocks: int):
    """Fix the step's swap budget (swap-out `blocks`, no swap-in), so a test chooses who fits."""
    policy.swap_budget = lambda: (0, blocks)
    return policy


def where(sched: Scheduler, request: Request) -> tuple[int, int, PauseMode]:
    rid = request.request_id
    return sched.blocks.num_blocks_of(rid), sched.blocks.num_host_blocks_of(rid), request.pause_mode


# ------------------------------------------------------------------ InferCept's per-step plan (spec 3.5.1 item 4)
def test_infercept_swaps_the_most_wasteful_within_the_budget_and_keeps_the_rest():
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 6))
    big = paused(sched, "big", 24, 10.0)        # w_p = 10 * 24 = 240, w_d = 0.792: score 0.792, the largest
    mid = paused(sched, "mid", 16, 10.0)        # w_p = 160, w_d = 0.28 < w_p: score 0.28, kept (room left)
    short = paused(sched, "short", 8, 0.001)    # w_p = 0.008 <= w_d = 0.064: score 0.008, kept
    sched.schedule(0.0)
    assert where(sched, big) == (0, 6, PauseMode.SWAP)       # the budget's 6 blocks: all of big
    assert where(sched, mid) == (4, 0, PauseMode.PRESERVE)
    assert where(sched, short) == (2, 0, PauseMode.PRESERVE)
    assert sched.num_discards == 0


def test_infercept_keeps_paused_memory_nobody_needs_and_gives_it_up_when_a_request_needs_it():
    """Memory is waste only when someone needs it (spec 8.1; the chat gap in docs/policies.md): a
    request whose chunked recompute wastes far less than keeping it (w_d = 0.28 < w_p = 160) keeps
    its KV while the pool has room, and is discarded (no swap budget) when a new request needs its
    blocks (5 usable: it holds 4, the new request needs 2)."""
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 0), device_blocks=6)
    held = paused(sched, "held", 16, 10.0)          # 4 of the 5 usable blocks
    assert not sched.schedule(0.0).memory_short
    assert where(sched, held) == (4, 0, PauseMode.PRESERVE) and sched.num_discards == 0
    sched.add(Request("new", [5] * 8, SamplingParams(max_tokens=4), 1.0))    # needs 2 blocks, 1 free
    out = sched.schedule(1.0)
    assert [(s.request.request_id, s.num_query_tokens) for s in out.scheduled] == [("new", 8)]
    assert out.memory_short
    assert where(sched, held) == (0, 0, PauseMode.DISCARD) and sched.num_discards == 1


def test_infercept_score_is_the_lesser_of_preserve_and_discard_waste():
    """Spec 3.5.1 eq. 5: the budget swaps out the largest min(w_p, w_d) first. Ranked by
    max(w_p, w_d) `long` would go first, by w_d alone `blip` would (it ties `quick` and arrived
    first)."""
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 6))
    quick = paused(sched, "quick", 24, 0.02, arrival=1.0)   # w_p = 0.48, w_d = 0.792: score 0.48
    long = paused(sched, "long", 16, 10.0, arrival=2.0)     # w_p = 160, w_d = 0.28: score 0.28
    blip = paused(sched, "blip", 24, 0.001, arrival=0.0)    # w_p = 0.024, w_d = 0.792: score 0.024
    sched.schedule(0.0)
    assert where(sched, quick) == (0, 6, PauseMode.SWAP)
    assert where(sched, long) == (4, 0, PauseMode.PRESERVE)
    assert where(sched, blip) == (6, 0, PauseMode.PRESERVE)


def test_infercept_preserves_when_discard_waste_equals_preserve_waste():
    """Discard only when w_d < w_p strictly (spec 3.5.1 item 4: "preserve it otherwise")."""
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 0))
    tie = paused(sched, "tie", 8, 0.008)        # w_p = 0.008 * 8 = 0.064 = w_d = 0.001 * 8**2
    sched.schedule(0.0)
    assert where(sched, tie) == (2, 0, PauseMode.PRESERVE)


def test_infercept_leaves_a_call_that_is_over_preserved_never_swapped():
    """Remaining time 0 (the oracle's 1 s call started 5 s ago): w_p = 0, so its score is 0; it is
    neither swapped out, though the budget is ample, nor discarded."""
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 64))
    over = paused(sched, "over", 16, 1.0, start=0.0)
    sched.schedule(5.0)
    assert where(sched, over) == (4, 0, PauseMode.PRESERVE)
    assert sched.num_discards == 0


def test_infercept_victims_first_the_one_whose_eviction_saves_the_most_ties_by_priority_time():
    """Victims by w_p - w_d, the waste that giving the memory up saves: `long_call` first (its call
    runs 100 s), though by min(w_p, w_d) `big` (0.792) and `ending` (0.24) would go before it."""
    policy = InferCeptPolicy(HAND_PROFILE)
    sched = scheduler_with(policy)
    late_twin = paused(sched, "late-twin", 16, 10.0, arrival=2.0)    # 160 - 0.28
    big = paused(sched, "big", 24, 10.0, arrival=3.0)                # 240 - 0.792
    early_twin = paused(sched, "early-twin", 16, 10.0, arrival=1.0)  # 160 - 0.28
    long_call = paused(sched, "long-call", 8, 100.0, arrival=4.0)    # 800 - 0.064
    ending = paused(sched, "ending", 24, 0.01, arrival=0.0)          # 0.24 - 0.792 < 0: last
    gone = paused(sched, "gone", 8, 10.0)
    sched.discard_paused(gone)                                       # holds nothing: not a victim
    assert policy.victims(0.0) == [long_call, big, early_twin, late_twin, ending]


# ------------------------------------------------------------------ static heuristics (spec 3.4)
@pytest.mark.parametrize("variant, modes", [
    ("H-S", ["preserve", "swap", "swap", "swap"]),           # swap from 4 s
    ("H-D", ["preserve", "preserve", "preserve", "discard"]),   # discard from 7 s
    ("H-B", ["preserve", "swap", "swap", "discard"]),        # preserve < 4, swap [4, 7), discard >= 7
])
def test_heuristic_thresholds_at_exactly_4_and_7_seconds(variant, modes):
    policy = HeuristicPolicy(OracleEstimator(), variant)
    scheduler_with(policy)
    decided = []
    for seconds in (3.999, 4.0, 6.999, 7.0):
        request = Request("r", [5] * 4, SamplingParams(max_tokens=4), 0.0)
        request.interceptions.append(Interception(("r", 0), 1.0, expected_duration=seconds))
        decided.append(policy.on_pause(request, 1.0).value)
    assert decided == modes


# ------------------------------------------------------------------ the scheduler's own choices (spec 2.3)
def test_running_requests_take_the_budget_oldest_first():
    sched = scheduler_with(PreservePolicy(), budget=12)
    new = running(sched, "new", 0, 11, arrival=2.0)     # listed first, arrived last
    old = running(sched, "old", 0, 11, arrival=0.0)
    out = sched.schedule()
    assert [(s.request, s.num_query_tokens) for s in out.scheduled] == [(old, 11), (new, 1)]


def test_out_of_blocks_preempts_the_newest_running_request():
    # 3 usable device blocks, all held; a's next token needs a 2nd block
    sched = scheduler_with(PreservePolicy(), device_blocks=4)
    a = running(sched, "a", 4, 1, arrival=0.0)
    c = running(sched, "c", 3, 1, arrival=1.0)          # ties b; the larger id is the newer
    b = running(sched, "b", 3, 1, arrival=1.0)          # listed after c: still scheduled after c's preemption
    c.num_preemptions = 1
    out = sched.schedule()
    assert out.preempted == [c] and c.status is RequestStatus.WAITING and c.num_preemptions == 2
    assert [s.request for s in out.scheduled] == [a, b]
    assert sched.blocks.num_blocks_of("a") == 2


def test_preemption_never_takes_a_request_already_scheduled_this_step():
    """`z` and `y` tie on priority_time; `z` (listed first) is scheduled first. When `y` then needs a
    block, the newest by (priority_time, id) is `z`, but it already has its tokens: `y` yields."""
    sched = scheduler_with(PreservePolicy(), device_blocks=4)
    paused(sched, "p", 4, 10.0)                          # preserved: holds the 3rd block, no victim
    z = running(sched, "z", 3, 1)
    y = running(sched, "y", 4, 1)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == [z] and out.preempted == [y]
    assert z.status is RequestStatus.RUNNING and y.status is RequestStatus.WAITING


@pytest.mark.parametrize("policy, resumed_first", [(DiscardPolicy(), False), (ImprovedDiscardPolicy(), True)])
def test_vllm_discard_requeues_at_the_back_improved_discard_keeps_arrival_priority(policy, resumed_first):
    """Spec 3.1: vLLM's discard appends the resumed request like a new one (priority = resume time);
    ImprovedDiscard keeps its original arrival priority."""
    sched = scheduler_with(policy)
    resumed = running(sched, "resumed", 8, 0, arrival=0.0)
    sched.pause(resumed, Interception(("resumed", 0), 1.0, expected_duration=4.0), 1.0)
    assert where(sched, resumed) == (0, 0, PauseMode.DISCARD)
    newer = Request("newer", [5] * 4, SamplingParams(max_tokens=4), 3.0)
    sched.add(newer, 3.0)
    resumed.token_ids.append(7)
    sched.resume(resumed, 5.0)
    assert resumed.priority_time == (0.0 if resumed_first else 5.0)
    order = [resumed, newer] if resumed_first else [newer, resumed]
    assert policy.queue_order() == order


# ------------------------------------------------------------------ no step over its budget (spec 2.3)
class RecordingRunner(FakeRunner):
    def __init__(self):
        self.steps: list[tuple[int, int]] = []

    def execute(self, output):
        self.steps.append((sum(s.num_query_tokens for s in output.scheduled), len(output.scheduled)))
        return super().execute(output)


@pytest.mark.parametrize("policy", POLICIES)
def test_no_step_exceeds_the_token_budget_or_the_request_limit(policy):
    now = [0.0]
    runner = RecordingRunner()
    engine = engine_with(runner, policy, profile=HAND_PROFILE, num_kv_blocks=24, num_host_blocks=16, max_num_seqs=3,
                         max_model_len=64, clock=lambda: now[0])
    # three of every four requests call a tool after 2 tokens, for 0.5, 1 or 1.5 s
    for i in range(12):
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, intercept_after=2 if i % 4 else None)
        engine.add_request([5] * (5 + 2 * i), params, hint=SegmentHint(call_duration=0.5 * (1 + i % 3)))
    most_running = 0
    for _ in range(300):
        if not (engine.has_work() or engine.scheduler.paused):
            break
        now[0] += 0.5
        for rid, request in list(engine.scheduler.paused.items()):
            call = request.interceptions[-1]
            if now[0] >= call.start_time + call.expected_duration:
                engine.resume(rid, [7] * 3)
        most_running = max(most_running, len(engine.scheduler.running))
        engine.step()
    assert all(r.status.finished for r in engine.requests.values())
    assert max(tokens for tokens, _ in runner.steps) == 12      # busy: some steps fill the budget ...
    assert max(n for _, n in runner.steps) == 3                 # ... and the request limit
    if policy in ("preserve", "heuristic", "lamps"):
        assert most_running > 3         # preserved requests resumed while others ran: more than can compute
    assert all(tokens <= 12 and n <= 3 for tokens, n in runner.steps)


# ------------------------------------------------------------------ block manager ends (spec 2.1)
def test_swap_out_moves_the_last_device_blocks_and_swap_in_the_first_host_blocks():
    bm = BlockManager(8, 4, num_host_blocks=8)
    table = list(bm.ensure("s", 16))                    # logical blocks L0..L3
    l0, l1, l2, l3 = table
    first = bm.swap_out("s", 1)                         # L3 leaves
    assert [d for d, _ in first] == [l3] and bm.tables["s"] == [l0, l1, l2]
    second = bm.swap_out("s", 2)                        # then L1, L2
    assert [d for d, _ in second] == [l1, l2] and bm.tables["s"] == [l0]
    h1, h2 = (h for _, h in second)
    h3 = first[0][1]
    assert bm.host_tables["s"] == [h1, h2, h3]          # host part in logical order L1, L2, L3
    back = bm.swap_in("s", 1)                           # L1 comes back first, after L0
    assert [h for h, _ in back] == [h1]
    assert bm.tables["s"] == [l0, back[0][1]] and bm.host_tables["s"] == [h2, h3]
    bm.check_invariants()


# ------------------------------------------------------------------ the other rules of spec 3
def test_swap_baseline_moves_the_whole_context_or_keeps_it_without_host_room():
    """Spec 3.3: the whole context goes out (in the step after the pause); if the host cannot take
    it all, the request stays preserved (the chunk-fill scheduler's fallback), nothing moved."""
    from scheduling.policies import SwapPolicy
    roomy = scheduler_with(SwapPolicy(), host_blocks=16)
    out_whole = paused(roomy, "r", 16, 5.0)
    assert out_whole.pause_mode is PauseMode.SWAP
    roomy.schedule(0.0)
    assert where(roomy, out_whole) == (0, 4, PauseMode.SWAP)
    cramped = scheduler_with(SwapPolicy(), host_blocks=3)
    kept = paused(cramped, "r", 16, 5.0)
    cramped.schedule(0.0)
    assert where(cramped, kept) == (4, 0, PauseMode.PRESERVE)


@pytest.mark.parametrize("mode, queue, status", [
    (PauseMode.PRESERVE, "running", RequestStatus.RUNNING),
    (PauseMode.SWAP, "swapped", RequestStatus.SWAPPED),
    (PauseMode.DISCARD, "waiting", RequestStatus.WAITING),
])
def test_resume_queues_by_where_the_kv_is(mode, queue, status):
    """Spec 3.5.2 item 7: preserved -> running, swapped -> swapped, discarded -> waiting."""
    sched = scheduler_with(PreservePolicy())
    request = paused(sched, "r", 8, 5.0)
    if mode is PauseMode.SWAP:
        sched.blocks.swap_out("r", 1)
    elif mode is PauseMode.DISCARD:
        sched.discard_paused(request)
    request.token_ids.extend([7, 7])
    request.tokens_since_resume = 3
    sched.resume(request, 5.0)
    assert request.status is status and getattr(sched, queue) == [request]
    assert request.pause_mode is None and request.tokens_since_resume == 0     # a new segment starts
    sched.finish(request, RequestStatus.FINISHED_ABORTED)
    assert request.pause_mode is None and getattr(sched, queue) == []


def test_swapped_request_comes_back_from_the_front_within_the_swap_in_budget_and_computes_when_whole():
    """Spec 3.5.2 item 5: chunked swap-in, n = min(budget, host blocks); the returned tokens are
    computed only in the step the swap-in completes."""
    policy = PreservePolicy()
    policy.uses_host_pool = True
    policy.swap_budget = lambda: (2, 0)
    sched = scheduler_with(policy)
    request = paused(sched, "r", 16, 5.0)
    sched.blocks.swap_out("r", 3)                        # 1 block on the device, 3 on the host
    request.token_ids.extend([7, 7])
    sched.resume(request, 5.0)
    first = sched.schedule(5.0)
    assert len(first.swap_in) == 2 and first.scheduled == []
    assert request.status is RequestStatus.SWAPPED and sched.blocks.num_host_blocks_of("r") == 1
    second = sched.schedule(5.0)
    assert len(second.swap_in) == 1 and [(s.request, s.num_query_tokens) for s in second.scheduled] == [(request, 2)]


def test_fcfs_queue_head_that_cannot_get_room_blocks_the_ones_behind():
    """Spec 2.3 / 3.5.1 item 5: first come, first served; a ranking policy skips (tests/test_lamps_decisions.py)."""
    sched = scheduler_with(PreservePolicy(), device_blocks=3)   # 2 usable blocks; big's 12-token chunk needs 3
    big = Request("big", [5] * 40, SamplingParams(max_tokens=4), 0.0)
    small = Request("small", [5] * 4, SamplingParams(max_tokens=4), 1.0)
    sched.add(big)
    sched.add(small)
    assert sched.schedule().scheduled == [] and small.status is RequestStatus.WAITING


def test_paused_victims_give_up_memory_before_a_running_request_is_preempted():
    """Spec 3.5.2 item 4: the paused victim is swapped out within the budget and the host room,
    else discarded; the running requests keep their KV. The victim's call is over (score 0), so
    the step's plan leaves it preserved and only the shortage moves it."""
    for budget, host_full, expected in ((1, False, (0, 1, PauseMode.SWAP)), (0, False, (0, 0, PauseMode.DISCARD)),
                                        (1, True, (0, 0, PauseMode.DISCARD))):
        sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), budget), device_blocks=4,
                               host_blocks=1)
        if host_full:
            sched.blocks.ensure("earlier", 4)
            sched.blocks.swap_out("earlier", 1)
        victim = paused(sched, "victim", 4, 1.0, start=0.0)
        a = running(sched, "a", 4, 1)
        b = running(sched, "b", 3, 1, arrival=1.0)        # the newest running request
        out = sched.schedule(5.0)
        assert out.preempted == [] and [s.request for s in out.scheduled] == [a, b]
        assert where(sched, victim) == expected


@pytest.mark.parametrize("swap_limit, recomputed", [(24.0, False), (1.0, True)])
def test_active_discard_recomputes_the_oldest_swapped_only_when_cheaper_than_swapping_in(swap_limit, recomputed):
    """Spec 3.5.2 item 1, generalized (InferCept._active_discard docstring): with nothing waiting, the
    oldest swapped request is recomputed if a_f * C is below the swap-in time of its host part.
    C = 16 tokens: 1 ms/token * 16 = 16 ms. 8 tokens on the host: with N(S) = 24 tokens per
    22 ms step, 8 * 22/24 = 7.3 ms (swap in); with N(S) = 1, 8 * 22 = 176 ms (recompute)."""
    import dataclasses
    sched = scheduler_with(InferCeptPolicy(dataclasses.replace(HAND_PROFILE, swap_limit_tokens=swap_limit)))
    old = paused(sched, "old", 16, 1.0, arrival=0.0)
    new = paused(sched, "new", 16, 1.0, arrival=1.0)
    for request in (old, new):
        sched.blocks.swap_out(request.request_id, 2)
        sched.resume(request, 1.0)
    assert sched.swapped == [old, new]
    sched.policy._active_discard()
    assert (old.status is RequestStatus.WAITING) is recomputed
    assert new.status is RequestStatus.SWAPPED
    sched.add(Request("w", [5] * 4, SamplingParams(max_tokens=4), 2.0))
    sched.policy._active_discard()                       # something waits: never
    assert new.status is RequestStatus.SWAPPED


# ------------------------------------------------------------------ swapped requests coming back (spec 3.5.2 item 5)
def swapped(sched: Scheduler, rid: str, tokens: int, host_blocks: int, arrival: float = 0.0,
            inflight: int = 1) -> Request:
    """A resumed request with `tokens` of KV, its last `host_blocks` blocks in the host pool, and
    `inflight` result tokens to compute."""
    request = paused(sched, rid, tokens, 1.0, arrival)
    sched.blocks.swap_out(rid, host_blocks)
    request.token_ids.extend([7] * inflight)
    sched.resume(request, 1.0)
    return request


def with_host_pool(policy, swap_in: int, swap_out: int = 0):
    """A policy that may swap, with a fixed budget per step."""
    policy.uses_host_pool = True
    policy.swap_budget = lambda: (swap_in, swap_out)
    return policy


def test_swapped_requests_share_the_steps_swap_in_budget_oldest_first():
    sched = scheduler_with(with_host_pool(PreservePolicy(), 3))
    old = swapped(sched, "old", 8, 2, arrival=0.0)
    new = swapped(sched, "new", 8, 2, arrival=1.0)
    out = sched.schedule(1.0)
    assert len(out.swap_in) == 3 and old.status is RequestStatus.RUNNING
    assert where(sched, new)[:2] == (1, 1) and new.status is RequestStatus.SWAPPED


def test_a_swap_in_short_of_device_blocks_marks_the_step_short_of_memory():
    """The pool (4 usable blocks) is held by a paused victim whose call is over: bringing `s` back
    needs its blocks, and that shortage is what the waste meter's preserve-while-short counts."""
    policy = InferCeptPolicy(HAND_PROFILE)
    policy.swap_budget = lambda: (4, 4)
    sched = scheduler_with(policy, device_blocks=5)
    s = swapped(sched, "s", 16, 4, inflight=0)
    victim = paused(sched, "victim", 16, 1.0)
    out = sched.schedule(5.0)
    assert out.memory_short
    assert where(sched, s)[:2] == (4, 0) and where(sched, victim) == (0, 4, PauseMode.SWAP)


def test_a_swap_in_and_then_its_compute_take_from_the_paused_victims_exactly_the_blocks_they_lack():
    """6 usable device blocks: the victims hold 1 + 3, so `s` lacks 2 of its 4 host blocks. The
    first victim gives its only block, the second one more; then the result's token needs a 5th
    block, and the second victim gives one more (the victims' calls are over: the plan leaves them
    alone, and they rank by arrival)."""
    policy = InferCeptPolicy(HAND_PROFILE)
    policy.swap_budget = lambda: (4, 4)
    sched = scheduler_with(policy, device_blocks=7)
    s = swapped(sched, "s", 16, 4)
    p1 = paused(sched, "p1", 4, 1.0, arrival=1.0)
    p2 = paused(sched, "p2", 12, 1.0, arrival=2.0)
    out = sched.schedule(5.0)
    assert where(sched, p1) == (0, 1, PauseMode.SWAP) and where(sched, p2) == (1, 2, PauseMode.SWAP)
    assert [(r.request, r.num_query_tokens) for r in out.scheduled] == [(s, 1)]
    assert where(sched, s)[:2] == (5, 0)


def test_a_request_back_from_the_host_without_room_to_compute_preempts_nobody():
    """Served from the queue, it may not preempt running requests (itself included): it keeps its
    KV and computes in a later step."""
    sched = scheduler_with(with_host_pool(PreservePolicy(), 4), device_blocks=5)   # 4 usable blocks
    s = swapped(sched, "s", 16, 4)                  # back whole; the result's token needs a 5th block
    out = sched.schedule(1.0)
    assert len(out.swap_in) == 4 and out.preempted == [] and out.scheduled == []
    assert s.status is RequestStatus.RUNNING and where(sched, s)[:2] == (4, 0)


@pytest.mark.parametrize("with_running, blocks_back", [(False, 1), (True, 0)])
def test_a_zero_swap_in_budget_still_brings_one_block_back_when_nothing_runs(with_running, blocks_back):
    """Nothing running would free memory or hide a copy: at least one block per step comes back, so
    a swapped request never waits forever (scheduler.py docstring); with a batch running, none."""
    sched = scheduler_with(with_host_pool(PreservePolicy(), 0))
    s = swapped(sched, "s", 16, 3)
    if with_running:
        running(sched, "r", 4, 1)
    out = sched.schedule(1.0)
    assert len(out.swap_in) == blocks_back and where(sched, s)[:2] == (1 + blocks_back, 3 - blocks_back)


def test_a_swapped_request_that_cannot_come_back_stops_the_swapped_behind_it_not_the_waiting():
    """FCFS per queue (spec 2.3): `big` lacks device room (a batch runs, so no swapped request is
    recomputed for it), `small` behind it would fit but waits; a new request still runs."""
    sched = scheduler_with(with_host_pool(PreservePolicy(), 8), device_blocks=6)   # 5 usable blocks
    big = swapped(sched, "big", 16, 4, arrival=0.0)
    small = swapped(sched, "small", 8, 1, arrival=1.0)
    running(sched, "r", 2, 1)                           # 1 block: 3 free, `big` needs 4
    sched.add(Request("new", [5] * 3, SamplingParams(max_tokens=4), 2.0))
    out = sched.schedule(1.0)
    assert out.swap_in == [] and big.status is small.status is RequestStatus.SWAPPED
    assert "new" in [r.request.request_id for r in out.scheduled]


def test_with_nothing_running_a_blocked_swap_in_recomputes_the_newest_other_swapped_holder():
    """6 usable device blocks, 4 of them held by the device parts of `mid` and `newest_holder`;
    `oldest` needs 4 for its host part. Nothing runs, so no block would ever come free: the newest
    swapped request that holds device blocks is recomputed (`newest`, all on the host, holds none)."""
    sched = scheduler_with(with_host_pool(PreservePolicy(), 4), device_blocks=7)
    oldest = swapped(sched, "oldest", 16, 4, arrival=0.0)
    mid = swapped(sched, "mid", 16, 2, arrival=1.0)
    newest_holder = swapped(sched, "newest-holder", 16, 2, arrival=2.0)
    newest = swapped(sched, "newest", 8, 2, arrival=3.0)
    newest_holder.num_preemptions = 1
    out = sched.schedule(1.0)
    assert out.preempted == [newest_holder] and newest_holder.num_preemptions == 2
    assert newest_holder.status is RequestStatus.WAITING and sched.waiting == [newest_holder]
    assert where(sched, newest_holder)[:2] == (0, 0)
    assert oldest.status is RequestStatus.RUNNING and where(sched, oldest)[:2] == (4, 0)
    assert where(sched, mid)[:2] == (2, 2) and where(sched, newest)[:2] == (0, 2)


def test_a_running_request_short_of_room_recomputes_swapped_holders_newest_first_rather_than_itself():
    """5 usable blocks: `r` holds 3 and needs 5; `h1` and `h2`, resumed half on the host, hold one
    each and cannot come back while `r` runs (no swap-in budget). Preempting itself, `r` would wait
    for their room and they for its: they are recomputed instead, the newest first, until it fits."""
    sched = scheduler_with(with_host_pool(PreservePolicy(), 0), device_blocks=6)
    h1 = swapped(sched, "h1", 8, 1, arrival=0.0)
    h2 = swapped(sched, "h2", 8, 1, arrival=1.0)
    r = running(sched, "r", 12, 5, arrival=2.0)
    out = sched.schedule(1.0)
    assert out.preempted == [h2, h1] and h1.status is h2.status is RequestStatus.WAITING
    assert [(s.request, s.num_query_tokens) for s in out.scheduled] == [(r, 5)]
    assert where(sched, h1)[:2] == where(sched, h2)[:2] == (0, 0) and where(sched, r)[:2] == (5, 0)


def test_a_blocked_swap_in_with_no_other_holder_keeps_its_kv_and_waits():
    """The device is held by `s`'s own part and a preserved paused request: `s` is not recomputed."""
    sched = scheduler_with(with_host_pool(PreservePolicy(), 4), device_blocks=5)
    s = swapped(sched, "s", 16, 2)
    paused(sched, "p", 8, 10.0)
    out = sched.schedule(1.0)
    assert out.preempted == [] and out.swap_in == [] and out.scheduled == []
    assert s.status is RequestStatus.SWAPPED and where(sched, s)[:2] == (2, 2)


# ------------------------------------------------------------------ policies' defaults and loops
def test_policies_without_the_host_pool_may_move_no_block():
    for policy in (PreservePolicy(), DiscardPolicy(), ImprovedDiscardPolicy()):
        assert policy.swap_budget() == (0, 0)


def test_heuristic_defaults_to_h_b():
    policy = HeuristicPolicy(OracleEstimator())
    assert (policy.swap_from, policy.discard_from) == (4.0, 7.0)


def test_a_ranking_policy_skips_a_blocked_request_unless_it_starves():
    """The default `is_starving` is False: a ranking policy without a starvation guard lets the
    requests behind a blocked one run."""
    class Ranked(PreservePolicy):
        ranks_queues = True

    sched = scheduler_with(Ranked(), device_blocks=3)          # 2 usable blocks; big needs 3
    big = Request("big", [5] * 40, SamplingParams(max_tokens=4), 0.0)
    small = Request("small", [5] * 4, SamplingParams(max_tokens=4), 1.0)
    sched.add(big)
    sched.add(small)
    assert [s.request for s in sched.schedule().scheduled] == [small]


def test_swap_baseline_swaps_each_paused_request_whatever_the_ones_paused_before():
    """`a` is already out, `b` stayed preserved (no host room for its 6 blocks): neither stops the
    swap of `c`, which holds one block."""
    from scheduling.policies import SwapPolicy
    sched = scheduler_with(SwapPolicy(), host_blocks=5)
    a = paused(sched, "a", 8, 5.0)
    sched.schedule(0.0)
    b = paused(sched, "b", 24, 5.0)
    sched.schedule(0.0)
    c = paused(sched, "c", 4, 5.0)
    sched.schedule(0.0)
    assert [where(sched, r) for r in (a, b, c)] == [(0, 2, PauseMode.SWAP), (6, 0, PauseMode.PRESERVE),
                                                    (0, 1, PauseMode.SWAP)]


def test_infercept_swaps_out_what_the_budget_allows_of_a_request_larger_than_it():
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 2))
    big = paused(sched, "big", 24, 10.0)
    sched.schedule(0.0)
    assert where(sched, big) == (4, 2, PauseMode.SWAP)


def test_infercept_victims_skip_requests_without_device_blocks():
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 0))
    gone = paused(sched, "gone", 8, 10.0)
    sched.discard_paused(gone)
    kept = paused(sched, "kept", 8, 10.0)
    assert sched.policy.victims(0.0) == [kept]


@pytest.mark.parametrize("running_query, recomputed", [(11, True), (12, False)])
def test_active_discard_only_when_the_running_batch_leaves_compute(running_query, recomputed):
    """Spec 3.5.2 item 1: the recompute uses idle compute, so a batch of S = 12 query tokens rules it
    out; what counts is the batch's query tokens, not its context (40 tokens here)."""
    import dataclasses
    sched = scheduler_with(InferCeptPolicy(dataclasses.replace(HAND_PROFILE, swap_limit_tokens=1.0)))
    s = swapped(sched, "s", 16, 2)
    running(sched, "r", 40 - running_query, running_query)
    sched.policy._active_discard()
    assert (s.status is RequestStatus.WAITING) is recomputed


@pytest.mark.parametrize("behind, running_requests, recomputed",
                         [(0, 0, False), (3, 0, True), (3, 8, True), (3, 9, False)])
def test_active_discard_weighs_the_batchs_wait_against_the_links_backlog(behind, running_requests, recomputed):
    """Recompute the oldest swapped request when the swapped requests' wait for the link (its
    backlog's copy time beyond this step's forward, times the swapped requests) exceeds the
    recompute's a_f * C times the running requests and itself. HAND_PROFILE: 1 ms a token, 10 ms a
    step, copies 22/24 ms a token. "old" has 16 tokens, all on the host: 16 ms of recompute.
    * alone: backlog 16 tokens, 14.7 ms - 10 = 4.7 ms x 1 < 16 x 1: swap in;
    * 3 more swapped of 16 tokens: backlog 58.7 ms - 10 = 48.7 x 4 = 195 > 16: recompute;
    * and 8 running requests of 1 query token: 58.7 - 18 = 40.7 x 4 = 163 > 16 x 9 = 144: recompute;
      9 of them: 39.7 x 4 = 159 < 16 x 10 = 160: swap in."""
    sched = scheduler_with(InferCeptPolicy(HAND_PROFILE))
    old = swapped(sched, "old", 16, 4, arrival=0.0)
    for k in range(behind):
        swapped(sched, f"s{k}", 16, 4, arrival=1.0 + k)
    for k in range(running_requests):
        running(sched, f"r{k}", 4, 1, arrival=10.0 + k)
    sched.policy._active_discard()
    assert (old.status is RequestStatus.WAITING) is recomputed
    assert all(r.status is RequestStatus.SWAPPED for r in sched.swapped if r is not old)


def test_active_discard_keeps_swapping_when_recomputing_costs_the_same():
    """Swap limit 22 tokens per 22 ms step: 1 ms per token each way, as the recompute's a_f. All 16
    tokens on the host: 16 ms either way, and the recompute is chosen only when strictly cheaper."""
    import dataclasses
    sched = scheduler_with(InferCeptPolicy(dataclasses.replace(HAND_PROFILE, swap_limit_tokens=22.0)))
    s = swapped(sched, "s", 16, 4)
    sched.policy._active_discard()
    assert s.status is RequestStatus.SWAPPED


def test_a_step_scheduled_without_a_time_is_at_time_0():
    """The call started at 0 and lasts 1 s: at time 0 keeping it wastes more than its discard, so
    it is swapped out (at time 1 it would be over and stay)."""
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 6))
    request = paused(sched, "r", 24, 1.0)
    sched.schedule()
    assert where(sched, request) == (0, 6, PauseMode.SWAP)


# ------------------------------------------------------------------ making room (spec 3.5.2 items 4-6)
def test_paused_victims_give_a_running_request_exactly_the_blocks_it_lacks_first_victim_first():
    """5 usable device blocks, all held; `r` needs 2 more for its 8 tokens. The first victim gives
    its only block, the second one (calls over: ranked by arrival, left alone by the plan)."""
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 3), device_blocks=6)
    r = running(sched, "r", 4, 8)
    v1 = paused(sched, "v1", 4, 1.0, arrival=1.0)
    v2 = paused(sched, "v2", 12, 1.0, arrival=2.0)
    out = sched.schedule(5.0)
    assert [(s.request, s.num_query_tokens) for s in out.scheduled] == [(r, 8)]
    assert where(sched, v1) == (0, 1, PauseMode.SWAP) and where(sched, v2) == (2, 1, PauseMode.SWAP)


def test_a_new_request_takes_memory_from_a_paused_victim():
    """Spec 3.5.2 item 6: the memory of paused requests admits new ones (3 usable blocks)."""
    sched = scheduler_with(with_swap_out_budget(InferCeptPolicy(HAND_PROFILE), 1), device_blocks=4)
    victim = paused(sched, "victim", 8, 1.0)
    sched.add(Request("new", [5] * 8, SamplingParams(max_tokens=4), 1.0))
    out = sched.schedule(5.0)
    assert [(s.request.request_id, s.num_query_tokens) for s in out.scheduled] == [("new", 8)]
    assert where(sched, victim) == (1, 1, PauseMode.SWAP)


def test_a_request_back_from_the_host_and_a_new_one_share_what_the_budget_has_left():
    sched = scheduler_with(with_host_pool(PreservePolicy(), 4))
    s = swapped(sched, "s", 8, 2, inflight=2)
    new = Request("new", [5] * 20, SamplingParams(max_tokens=4), 2.0)
    sched.add(new)
    out = sched.schedule(1.0)
    assert [(r.request, r.num_query_tokens) for r in out.scheduled] == [(s, 2), (new, 10)]


def test_a_new_request_waits_when_the_running_ones_took_the_whole_budget():
    sched = scheduler_with(PreservePolicy())
    r = running(sched, "r", 0, 12)
    new = Request("new", [5] * 4, SamplingParams(max_tokens=4), 1.0)
    sched.add(new)
    out = sched.schedule()
    assert [(s.request, s.num_query_tokens) for s in out.scheduled] == [(r, 12)]
    assert new.status is RequestStatus.WAITING and sched.blocks.num_blocks_of("new") == 0


def test_every_discard_is_counted():
    sched = scheduler_with(DiscardPolicy())
    paused(sched, "a", 4, 1.0)
    paused(sched, "b", 4, 1.0)
    assert sched.num_discards == 2


def test_a_host_pool_of_one_block_is_enough_for_a_swapping_policy():
    assert scheduler_with(InferCeptPolicy(HAND_PROFILE), host_blocks=1).blocks.host.capacity == 1
    with pytest.raises(ValueError, match="host pool is empty"):
        scheduler_with(InferCeptPolicy(HAND_PROFILE), host_blocks=0)


def test_infercept_swap_budget_counts_free_memory_in_tokens():
    """Spec 3.5.1 item 2 with N(S) = 24 and S = 12: in = (N + F - S) / 2 tokens (F: free device
    tokens), out = N - in, at most the free host tokens plus the ones swap-in frees there. A
    waiting request makes the step a saturated one, of N(S)."""
    roomy = scheduler_with(InferCeptPolicy(HAND_PROFILE), device_blocks=5)        # F = 16: in 14, out 10
    roomy.add(Request("w", [5] * 4, SamplingParams(max_tokens=4), 0.0))
    assert roomy.policy.swap_budget() == (3, 2)
    full = scheduler_with(InferCeptPolicy(HAND_PROFILE), device_blocks=2, host_blocks=1)
    running(full, "r", 4)                                                     # F = 0: in 6, out 18 ...
    full.add(Request("w", [5] * 4, SamplingParams(max_tokens=4), 0.0))
    assert full.policy.swap_budget() == (1, 2)                                # ... but 4 + 4 host tokens


@pytest.mark.parametrize("running_query, budget", [(0, (1, 1)), (1, (1, 2)), (12, (2, 3))])
def test_infercept_swap_budget_follows_the_steps_forward(running_query, budget):
    """Nothing waits, so the step computes the running batch's query tokens x, and the copies it
    hides are N(x) = N(S) * T_fwd(x) / T_fwd(S) = 24 * (x + 10) / 22 tokens (HAND_PROFILE: 1 ms
    a token, 10 ms a step), 3 free host blocks of 4 tokens, 3 free device blocks (the fourth is the
    padding block). Nothing running, F = 12 free device tokens: N = 10.9, in = (N + F - S)/2 = 5.5 -> 1 block, out 5.5 -> 1 (N(S) would give 3 and 3).
    A running request holding 1 block, F = 8: x = 1, N = 12, in 4 -> 1, out 8 -> 2; x = 12, N =
    N(S) = 24, in 10 -> 2, out 14 -> 3."""
    sched = scheduler_with(InferCeptPolicy(HAND_PROFILE), device_blocks=4, host_blocks=3)
    if running_query:
        running(sched, "r", 4, running_query)
    assert sched.policy.swap_budget() == budget


def test_make_policy_heuristic_defaults_to_h_b_with_the_oracle_and_keeps_what_it_is_given():
    default = make_policy("heuristic")
    assert isinstance(default.estimator, OracleEstimator) and (default.swap_from, default.discard_from) == (4.0, 7.0)
    estimator = OracleEstimator()
    given = make_policy("heuristic", estimator=estimator, heuristic="H-S")
    assert given.estimator is estimator and (given.swap_from, given.discard_from) == (4.0, None)
