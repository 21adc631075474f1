"""LAMPS's decisions (spec 6.2-6.4): the victim order, the starvation threshold to the step, the score
cache and the re-ranking interval, quantum holders at the front, and which blocked request stops the
queue. Directly on the policy, with a Scheduler built around it (milliseconds)."""
from __future__ import annotations

import pytest

from helpers import HAND_PROFILE, scheduler_with
from test_lamps import make_request

from scheduling.lamps import LampsOptions, LampsPolicy, Plan
from scheduling.predictors import SegmentPrediction
from scheduling.request import Interception, PauseMode, Request, RequestStatus


def run_one_step_then_requeue(sched, request) -> None:
    """The request runs one step, then goes back to the waiting queue (as if preempted)."""
    sched.waiting.remove(request)
    sched.running.append(request)
    request.status = RequestStatus.RUNNING
    sched.schedule()
    sched.running.remove(request)
    sched.waiting.append(request)
    request.status = RequestStatus.WAITING


def requeued(rid: str) -> Request:
    """A 4-token request that ran before and is queued again: the state a preemption leaves."""
    request = make_request(rid, 4)
    request.recompute_until = request.num_tokens
    return request


def lamps(**options) -> LampsPolicy:
    return LampsPolicy(HAND_PROFILE, LampsOptions(**options))


def hand_plans(policy: LampsPolicy, scores: dict[str, float]) -> None:
    """Replace the plans' scores by hand and keep them: no re-scoring until step 1000."""
    for rid, score in scores.items():
        policy.plans[rid] = Plan(SegmentPrediction(2, None, 0), score=score)
    policy.options = LampsOptions(rerank_interval=1000, starvation_threshold=None)
    policy._step = 1


def blocked_behind_a_full_batch(policy: LampsPolicy):
    """A scheduler whose one seat is taken by a running request with nothing to compute, so the
    queued requests stay queued and every step looks the same."""
    sched = scheduler_with(policy, max_seqs=1)
    seat = make_request("seat", 4)
    sched.add(seat)
    sched.schedule()                        # step 0: the seat is taken
    seat.num_computed_tokens = seat.num_tokens
    return sched


# ------------------------------------------------------------------ victims (spec 6.2, as InferCept)
def test_victims_save_the_most_waste_first_by_the_predicted_time_left_ties_by_priority_time():
    """As InferCept orders them (w_p - w_d), with each call's predicted remaining time: equal
    contexts have equal discard waste, so the longest call left goes first."""
    policy = lamps()
    sched = scheduler_with(policy)
    calls = {"short": (1.0, 0.0), "late-twin": (5.0, 2.0), "long": (9.0, 3.0), "early-twin": (5.0, 1.0),
             "gone": (99.0, 0.0)}
    requests = {}
    for rid, (seconds, arrival) in calls.items():
        request = requests[rid] = make_request(rid, 8, arrival)
        sched.add(request)
        sched.blocks.ensure(rid, 8)
        request.num_computed_tokens = 8
        sched.waiting.remove(request)
        sched.running.append(request)
        policy.plans[rid].prediction = SegmentPrediction(2, seconds, 0)
        sched.pause(request, Interception((rid, 0), 0.0), 0.0)
    sched.discard_paused(requests["gone"])     # holds no device block: not a victim
    assert [r.request_id for r in policy.victims(0.0)] == ["long", "early-twin", "late-twin", "short"]
    # 6 s into the calls only "long" has time left (3 s); the others tie at none, by priority time
    assert [r.request_id for r in policy.victims(6.0)] == ["long", "short", "early-twin", "late-twin"]


def test_a_planned_discard_keeps_its_kv_until_a_request_needs_the_blocks():
    """Memory nobody takes is not wasted: a paused request planned for discard keeps its KV at the
    pause, and gives it up, its eviction saving the most (the longer call), when a new request
    needs the blocks."""
    policy = lamps(starvation_threshold=None)
    policy.swap_budget = lambda: (0, 0)             # no copies: a victim is discarded
    sched = scheduler_with(policy, device_blocks=7)     # 6 usable blocks of 4 tokens
    for rid, mode, call_seconds in (("to-discard", PauseMode.DISCARD, 50.0), ("to-keep", PauseMode.PRESERVE, 1.0)):
        request = make_request(rid, 8)
        sched.add(request)
        sched.blocks.ensure(rid, 8)
        request.num_computed_tokens = 8
        sched.waiting.remove(request)
        sched.running.append(request)
        policy.plans[rid].mode = mode
        policy.plans[rid].prediction = SegmentPrediction(2, call_seconds, 0)
        sched.pause(request, Interception((rid, 0), 0.0), 0.0)
    held = lambda rid: (sched.blocks.num_blocks_of(rid), sched.paused[rid].pause_mode)  # noqa: E731
    assert (held("to-discard"), held("to-keep"), sched.num_discards) == ((2, PauseMode.PRESERVE),
                                                                         (2, PauseMode.PRESERVE), 0)
    sched.add(make_request("new", 12))             # its 12 tokens need 3 blocks; 2 are free
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["new"]
    assert (held("to-discard"), held("to-keep"), sched.num_discards) == ((0, PauseMode.DISCARD),
                                                                         (2, PauseMode.PRESERVE), 1)


# ------------------------------------------------------------------ starvation (spec 6.4)
def test_starvation_quantum_comes_in_the_thresholdth_queued_step():
    """Each step a queued request counts one more step; in the step its count reaches the threshold
    it gets the quantum and sits at the front of that step's order (spec 6.4)."""
    threshold = 3
    policy = lamps(starvation_threshold=threshold, starvation_quantum=50)
    sched = blocked_behind_a_full_batch(policy)     # step 0 is done
    late = requeued("late")
    sched.add(late)                                 # queued from step 1 on
    granted = []
    for _ in range(threshold + 1):                  # steps 1 .. threshold + 1
        sched.schedule()
        granted.append(policy.is_starving(late))
    assert late.status is RequestStatus.WAITING
    assert granted == [False] * (threshold - 1) + [True, True]   # queued steps 1, 2: no; 3rd: yes
    assert policy.quanta_granted == 1


def test_a_fresh_request_never_counts_towards_starvation():
    """Spec 6.4: only a request that ran before counts; the same request once it has run does."""
    policy = lamps(starvation_threshold=2, starvation_quantum=50)
    sched = blocked_behind_a_full_batch(policy)
    fresh = make_request("fresh", 4)
    sched.add(fresh)
    for _ in range(5):
        sched.schedule()
    assert not policy.is_starving(fresh) and policy.quanta_granted == 0
    fresh.recompute_until = fresh.num_tokens                               # as if preempted
    sched.schedule()
    assert not policy.is_starving(fresh)
    sched.schedule()
    assert policy.is_starving(fresh)


def test_a_quantum_lasts_exactly_its_steps():
    policy = lamps(starvation_threshold=2, starvation_quantum=2)
    sched = blocked_behind_a_full_batch(policy)
    late = requeued("late")
    sched.add(late)
    front = []
    for _ in range(6):
        sched.schedule()
        front.append(policy.is_starving(late))
    # counts queued step 1, granted in the 2nd for 2 steps; then counts again from 1 and is
    # granted in its 2nd step after the quantum
    assert front == [False, True, True, False, True, True] and policy.quanta_granted == 2


def test_quantum_holders_go_first_oldest_first_whatever_their_scores():
    policy = lamps()
    sched = scheduler_with(policy)
    for i, rid in enumerate(["cheap", "starving-new", "mid", "starving-old"]):
        sched.waiting.append(make_request(rid, 4, arrival={"starving-old": -5.0}.get(rid, float(i))))
    hand_plans(policy, {"cheap": 1.0, "starving-new": 90.0, "mid": 5.0, "starving-old": 99.0})
    for rid in ("starving-new", "starving-old"):
        policy.plans[rid].front_until = 10
    assert [r.request_id for r in policy.queue_order()] == ["starving-old", "starving-new", "cheap", "mid"]


def test_with_a_threshold_of_one_a_queued_request_holds_quanta_back_to_back():
    policy = lamps(starvation_threshold=1, starvation_quantum=2)
    sched = blocked_behind_a_full_batch(policy)
    late = requeued("late")
    sched.add(late)
    granted_before = policy.quanta_granted          # the seat's, in step 0
    front = []
    for _ in range(6):
        sched.schedule()
        front.append(policy.is_starving(late))
    assert front == [True] * 6 and policy.quanta_granted - granted_before == 3     # steps 1, 3 and 5


def test_a_quantum_that_ends_while_running_restarts_the_count():
    """Granted in its 2nd queued step (steps 2 and 3 at the front), `late` runs in step 4, the first
    after its quantum: its count restarts, so queued again it waits 2 more steps for a new quantum."""
    policy = lamps(starvation_threshold=2, starvation_quantum=2)
    sched = blocked_behind_a_full_batch(policy)
    late = requeued("late")
    sched.add(late)
    for _ in range(3):                              # steps 1 to 3
        sched.schedule()
    assert policy.is_starving(late)
    run_one_step_then_requeue(sched, late)          # step 4, running
    front = []
    for _ in range(2):
        sched.schedule()
        front.append(policy.is_starving(late))
    assert front == [False, True]


# ------------------------------------------------------------------ the score cache and re-ranking (spec 6.5)
def test_a_plans_first_score_counts_the_running_batchs_query_tokens():
    """A batch running 2 query tokens (20 of context) leaves chunks of c_h = 10: a 10-token request
    predicted to generate 6 more builds 16 tokens in n = 2 chunks, 0.022 s * 10 * 3 = 0.66 token·s."""
    policy = lamps(starvation_threshold=None)
    sched = scheduler_with(policy)
    batch = make_request("batch", 22)
    batch.num_computed_tokens = 20
    sched.running.append(batch)
    sched.add(make_request("new", 10))
    assert policy.plans["new"].score == pytest.approx(0.022 * 10 * 3)


@pytest.mark.parametrize("running_query", [11, 12])
def test_rescoring_counts_a_saturated_batch_as_leaving_one_token_chunks(running_query):
    """A batch of S - 1 or S query tokens leaves c_h = 1: the queued request (15 tokens, its
    predicted 6 already generated, so 16 to hold) scores as in test_lamps.py's hand case."""
    policy = lamps(starvation_threshold=None)
    sched = scheduler_with(policy)
    queued = make_request("queued", 9)
    sched.add(queued)
    queued.token_ids.extend([7] * 6)
    queued.tokens_since_resume = 6
    batch = make_request("batch", running_query)
    sched.add(batch)
    sched.waiting.remove(batch)
    sched.running.append(batch)
    policy.on_running_scheduled()
    assert policy.plans["queued"].score == pytest.approx(0.022 * 1 * 17 * 16 / 2)
def test_rescored_when_the_length_changed_cached_otherwise():
    policy = lamps(starvation_threshold=None)
    sched = blocked_behind_a_full_batch(policy)
    queued = make_request("queued", 10)
    sched.add(queued)
    plan = policy.plans["queued"]
    sched.schedule()
    plan.score = -1.0
    sched.schedule()                                # same length, same batch: the cached score stays
    assert plan.score == -1.0
    queued.token_ids.append(7)                      # a result appended: 11 tokens
    sched.schedule()
    assert plan.score == policy.score(queued, plan, 0, 4) != -1.0


def test_rerank_only_every_k_steps():
    policy = lamps(starvation_threshold=None, rerank_interval=3)
    sched = blocked_behind_a_full_batch(policy)     # step 0 done
    queued = make_request("queued", 10)
    sched.add(queued)
    plan = policy.plans["queued"]
    rescored = []
    for step in range(1, 8):
        queued.token_ids.extend([7] * 4)            # a new block every step: the score changes
        plan.score = -1.0
        sched.schedule()
        rescored.append((step, plan.score != -1.0))
    assert [step for step, yes in rescored if yes] == [3, 6]


# ------------------------------------------------------------------ a blocked head (scheduler + ranking)
def _head_too_big_for_the_device(starving: bool):
    policy = lamps()
    # 2 usable device blocks: `big` needs 3 for its first 12-token chunk, `small` 1
    sched = scheduler_with(policy, device_blocks=3)
    big, small = make_request("big", 40, 0.0), make_request("small", 4, 1.0)
    sched.waiting.extend([big, small])
    hand_plans(policy, {"big": 1.0, "small": 2.0})   # big ranks first
    if starving:
        policy.plans["big"].front_until = 10
    out = sched.schedule()
    return [s.request.request_id for s in out.scheduled], big.status, small.status


def test_a_starving_head_that_cannot_get_room_blocks_the_queue():
    assert _head_too_big_for_the_device(starving=True) == ([], RequestStatus.WAITING, RequestStatus.WAITING)


def test_a_non_starving_head_that_cannot_get_room_is_skipped():
    assert _head_too_big_for_the_device(starving=False) == (["small"], RequestStatus.WAITING, RequestStatus.RUNNING)


def test_running_without_a_quantum_restarts_the_count():
    """Spec 6.4: a running request without a quantum has its counter reset."""
    policy = lamps(starvation_threshold=3, starvation_quantum=50)
    sched = blocked_behind_a_full_batch(policy)
    late = requeued("late")
    sched.add(late)
    sched.schedule()
    sched.schedule()                                # queued 2 steps: one short of the threshold
    run_one_step_then_requeue(sched, late)
    granted = []
    for _ in range(3):
        sched.schedule()
        granted.append(policy.is_starving(late))
    assert granted == [False, False, True]


@pytest.mark.parametrize("budget, expected", [
    (2, [(2, 2), (0, 4), (0, 4)]),
    (1, [(3, 1), (2, 2), (1, 3)]),
    (0, [(4, 0), (4, 0), (4, 0)]),      # no budget: it stays on the device
])
def test_a_planned_swap_moves_blocks_within_each_steps_budget(budget, expected):
    """Spec 6.2 (swap within the step's budget, lamps.py docstring): a request planned for SWAP is
    swapped out over as many steps as the budget takes."""
    policy = lamps()
    policy.swap_budget = lambda: (0, budget)
    sched = scheduler_with(policy)
    request = make_request("r", 16)
    sched.add(request)                              # planned at arrival
    sched.waiting.remove(request)                   # then ran: 16 tokens of KV, 4 blocks
    sched.running.append(request)
    request.status = RequestStatus.RUNNING
    sched.blocks.ensure("r", 16)
    request.num_computed_tokens = 16
    policy.plans["r"].mode = PauseMode.SWAP
    sched.pause(request, Interception(("r", 0), 0.0), 0.0)
    held = []
    for _ in range(3):
        sched.schedule()
        held.append((sched.blocks.num_blocks_of("r"), sched.blocks.num_host_blocks_of("r")))
    assert held == expected


# ------------------------------------------------------------------ one ranked list of swapped and waiting
def lamps_queue(device_blocks: int = 64):
    """LAMPS with a fixed swap-in budget of 4 blocks, and a helper that queues a resumed request
    with 8 tokens of KV, all in the host pool."""
    policy = lamps()
    policy.swap_budget = lambda: (4, 0)
    sched = scheduler_with(policy, device_blocks=device_blocks)

    def swapped(rid):
        request = make_request(rid, 9)
        sched.add(request)
        sched.waiting.remove(request)
        sched.blocks.ensure(rid, 8)
        sched.blocks.swap_out(rid, 2)
        request.num_computed_tokens = 8
        request.status = RequestStatus.SWAPPED
        sched.swapped.append(request)
        return request

    return policy, sched, swapped


def test_a_waiting_request_left_without_budget_does_not_stop_a_swapped_one_ranked_behind():
    """The running batch takes all 12 tokens: the new request ranked first cannot run, but the
    swapped one behind it still comes back (its copy needs no tokens)."""
    policy, sched, swapped = lamps_queue()
    batch, new = make_request("batch", 12), make_request("new", 4)
    sched.add(batch)
    sched.waiting.remove(batch)
    sched.running.append(batch)
    batch.status = RequestStatus.RUNNING
    sched.add(new)
    back = swapped("back")
    hand_plans(policy, {"batch": 0.0, "new": 1.0, "back": 2.0})
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == [batch] and new.status is RequestStatus.WAITING
    assert len(out.swap_in) == 2 and back.status is RequestStatus.RUNNING


def test_requests_as_big_as_a_refused_one_are_skipped_and_the_rest_still_served():
    """2 usable device blocks: `big` is refused room for its 12-token chunk (3 blocks), `twin` of
    the same size is skipped, and the swapped request ranked behind them swaps in."""
    policy, sched, swapped = lamps_queue(device_blocks=3)
    back = swapped("back")
    big, twin = make_request("big", 40), make_request("twin", 40)
    sched.add(big)
    sched.add(twin)
    hand_plans(policy, {"big": 1.0, "twin": 2.0, "back": 3.0})
    out = sched.schedule()
    assert len(out.swap_in) == 2 and back.status is RequestStatus.RUNNING
    assert big.status is twin.status is RequestStatus.WAITING
