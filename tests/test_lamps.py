"""LAMPS: predictions, strategy in advance, the memory-over-time score, the ranking and starvation
prevention, on the real scheduler with a fake runner (milliseconds)."""
from __future__ import annotations

import dataclasses
import statistics

import pytest

from helpers import HAND_PROFILE, FakeRunner, engine_with, scheduler_with
from infercept_jax import SamplingParams
from kvcache.block_manager import BlockManager
from scheduling.lamps import LampsOptions, LampsPolicy, Plan
from scheduling.length_model import LengthModel, SegmentFeatures
from scheduling.policies import PreservePolicy, make_policy
from scheduling.predictors import SegmentPrediction, SegmentPredictor
from scheduling.request import Interception, NextSegment, PauseMode, Request, RequestStatus, SegmentHint
from scheduling.scheduler import Scheduler, SchedulerConfig


def make_request(rid: str, prompt: int, arrival: float = 0.0, *, call_after: int | None = None,
                 max_tokens: int = 6, call_seconds: float | None = None, result: int | None = None) -> Request:
    request = Request(rid, [5] * prompt, SamplingParams(max_tokens=max_tokens), arrival)
    request.next_segment = NextSegment(max_output_tokens=max_tokens, ends_in_call=call_after is not None,
                                       call_after=call_after)
    request.hint = SegmentHint(call_duration=call_seconds, result_tokens=result)
    return request




def lamps_engine(num_kv_blocks: int = 64, max_num_seqs: int = 4, **options):
    """An engine around the fake runner under LAMPS with the hand profile (S = 12); `options` are
    LampsOptions fields."""
    return engine_with(FakeRunner(), "lamps", profile=HAND_PROFILE, num_kv_blocks=num_kv_blocks, num_host_blocks=16,
                       max_num_seqs=max_num_seqs, lamps=LampsOptions(**options))


# ------------------------------------------------------------------ the score, by hand
# mt(t) = 0.022 s * c_h * n(n+1)/2 with n = ceil(t / c_h), c_h = S - running query tokens.
# A 10-token prompt that generates 6 tokens, calls for 2 s and gets 5 back:
#   before = 16 tokens (n = 2): 0.022 * 12 * 3 = 0.792;  after = 6 + 5 -> 12 tokens (n = 1): 0.264
@pytest.mark.parametrize("mode, expected", [
    (PauseMode.PRESERVE, 0.792 + 16 * 2.0 + 0.264),          # the context idles through the call
    (PauseMode.DISCARD, 0.792 + 0.022 * 12 * 6),             # rebuilt with the rest: 28 tokens, n = 3
    (PauseMode.SWAP, 0.792 + 2 * (16 * 0.022 / 24) * 16 + 0.264),   # held while copied out and in
])
def test_score_of_each_strategy_by_hand(mode, expected):
    policy = LampsPolicy(HAND_PROFILE)
    request = make_request("r", 10)
    plan = Plan(SegmentPrediction(output_tokens=6, call_seconds=2.0, result_tokens=5), mode)
    assert policy.score(request, plan, running_query=0, bs=4) == pytest.approx(expected)


def test_score_without_a_call_and_as_the_request_progresses():
    policy = LampsPolicy(HAND_PROFILE)
    request = make_request("r", 10)
    plan = Plan(SegmentPrediction(output_tokens=6, call_seconds=None, result_tokens=0))
    assert policy.score(request, plan, running_query=0, bs=4) == pytest.approx(0.792)
    # a running batch of 6 query tokens leaves chunks of 6: 16 tokens take n = 3 steps
    assert policy.score(request, plan, running_query=6, bs=4) == pytest.approx(0.022 * 6 * 6)
    # 4 of the 6 tokens generated: 2 left, 12 tokens in all, one chunk
    request.tokens_since_resume = 4
    assert policy.score(request, plan, running_query=0, bs=4) == pytest.approx(0.264)


@pytest.mark.parametrize("running_query", [11, 12])
def test_score_with_a_saturated_batch_and_the_predicted_output_already_generated(running_query):
    """A batch of S - 1 or more query tokens leaves chunks of c_h = 1 token; a request that has
    generated its predicted 6 tokens still counts one more: 9 + 6 + 1 = 16 tokens, n = 16 chunks."""
    policy = LampsPolicy(HAND_PROFILE)
    request = make_request("r", 9)
    request.token_ids.extend([7] * 6)
    request.tokens_since_resume = 6
    plan = Plan(SegmentPrediction(output_tokens=6, call_seconds=None, result_tokens=0))
    assert policy.score(request, plan, running_query, bs=4) == pytest.approx(0.022 * 1 * 17 * 16 / 2)


# ------------------------------------------------------------------ strategy in advance
def test_classify_picks_the_least_waste():
    policy = LampsPolicy(HAND_PROFILE)
    sched = scheduler_with(policy)
    no_call = SegmentPrediction(6, None, 0)
    assert policy.classify(make_request("a", 10), no_call) == (PauseMode.PRESERVE, 0.0)
    instant = SegmentPrediction(6, 0.0, 5)
    assert policy.classify(make_request("b", 10), instant) == (PauseMode.PRESERVE, 0.0)
    # a long call on an empty batch: recompute costs only the request's own chunks, swap nothing
    mode, waste = policy.classify(make_request("c", 10), SegmentPrediction(6, 60.0, 5))
    assert mode is PauseMode.SWAP and waste == 0.0
    # with a running batch to stall, the swap costs more than recomputing 16 tokens in chunks
    running = make_request("d", 40)
    sched.running.append(running)
    running.num_computed_tokens = 40
    mode, waste = policy.classify(make_request("c", 10), SegmentPrediction(6, 60.0, 5))
    assert mode is PauseMode.DISCARD and 0 < waste < 16 * 60.0
    # a 1 ms call is cheapest kept: its waste is the context at the pause, 10 + 5 tokens in whole
    # blocks, held for the call
    assert policy.classify(make_request("e", 10), SegmentPrediction(5, 0.001, 5)) == \
        (PauseMode.PRESERVE, pytest.approx(16 * 0.001))


def test_planned_strategy_at_the_pause_keeps_the_kv_while_the_pool_has_room():
    """Planned while a batch runs: a long call is to be discarded (cheaper than stalling the batch
    for a swap), a short one kept. At the pause both keep their KV: the pool has room, so nobody
    needs the memory a discard would free (the eviction is in test_lamps_decisions)."""
    engine = lamps_engine(starvation_threshold=None)
    policy, blocks = engine.scheduler.policy, engine.blocks
    engine.add_request([5] * 40, SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0))   # a batch to stall
    for _ in range(4):
        engine.step()
    calls = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0, intercept_after=2)
    long_call = engine.add_request([5] * 8, calls, hint=SegmentHint(call_duration=100.0))
    short_call = engine.add_request([5] * 8, calls, hint=SegmentHint(call_duration=0.001))
    for _ in range(6):
        engine.step()
    assert engine.requests[long_call].status is RequestStatus.PAUSED
    assert engine.requests[short_call].status is RequestStatus.PAUSED
    assert policy.plans[long_call].mode is PauseMode.DISCARD
    assert policy.plans[short_call].mode is PauseMode.PRESERVE
    assert blocks.num_blocks_of(long_call) > 0 and blocks.num_blocks_of(short_call) > 0
    assert engine.scheduler.num_discards == 0


# ------------------------------------------------------------------ the ranking
def test_smaller_memory_time_goes_first_whatever_the_arrival():
    lamps = LampsPolicy(HAND_PROFILE)
    sched = scheduler_with(lamps)
    sched.add(make_request("long", 40, arrival=0.0, max_tokens=30))
    sched.add(make_request("short", 4, arrival=1.0, max_tokens=2))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_query_tokens) for s in out.scheduled] == [("short", 4), ("long", 8)]


@pytest.mark.parametrize("swapped_first, expected", [
    (False, ["waiting-small", "swapped-small", "waiting-big", "swapped-big"]),   # the paper: one list
    (True, ["swapped-small", "swapped-big", "waiting-small", "waiting-big"]),    # each queue ranked
])
def test_swapped_and_waiting_form_one_ranked_list_unless_swapped_go_first(swapped_first, expected):
    lamps = LampsPolicy(HAND_PROFILE)
    sched = scheduler_with(lamps)
    scores = {"swapped-big": 50.0, "waiting-small": 1.0, "swapped-small": 2.0, "waiting-big": 40.0}
    for i, (rid, score) in enumerate(scores.items()):
        request = make_request(rid, 4, arrival=float(i))
        lamps.plans[rid] = Plan(SegmentPrediction(2, None, 0), score=score)
        (sched.swapped if rid.startswith("swapped") else sched.waiting).append(request)
    # keep the hand-set scores (step 0 rescores)
    lamps.options = LampsOptions(rerank_interval=1000, swapped_first=swapped_first)
    lamps._step = 1
    assert [r.request_id for r in lamps.queue_order()] == expected


def test_fcfs_policies_keep_swapped_before_waiting_by_arrival():
    sched = Scheduler(SchedulerConfig(12, 8), BlockManager(64, 4), PreservePolicy())
    for i, rid in enumerate(["w1", "s1", "w0"]):
        (sched.swapped if rid.startswith("s") else sched.waiting).append(make_request(rid, 4, arrival=-i))
    assert [r.request_id for r in sched.policy.queue_order()] == ["s1", "w0", "w1"]


# ------------------------------------------------------------------ starvation prevention
def run_long_under_short_stream(threshold: int | None, ran_before: bool,
                                steps: int = 200) -> tuple[int | None, int | None, int]:
    """A 30-token request arrives; with `ran_before` it computes one chunk alone and is then
    preempted (as a memory shortage would), else it is fresh. Then two 2-token requests arrive every
    step, and two requests fit in a step. Returns the steps (of the stream) at which the long one got
    its first token and finished (None if it did not), and how many quanta the guard granted."""
    engine = lamps_engine(num_kv_blocks=256, max_num_seqs=2, starvation_threshold=threshold, starvation_quantum=50)
    policy = engine.scheduler.policy
    short = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
    long_id = engine.add_request([5] * 30, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
    long = engine.requests[long_id]
    if ran_before:
        engine.step()
        engine.scheduler._preempt(long)
        assert long.has_run and long.status is RequestStatus.WAITING
    first = None
    for step in range(steps):
        for _ in range(2):
            engine.add_request([5] * 2, short)
        engine.step()
        if first is None and long.first_token_time is not None:
            first = step
        if long.status.finished:
            return first, step, policy.quanta_granted
        for rid in [rid for rid, r in engine.requests.items() if r.status.finished]:
            engine.pop_finished(rid)
    return first, None, policy.quanta_granted


def test_a_requeued_long_request_under_a_stream_of_short_ones_finishes_within_the_bound():
    threshold = 20
    first, finished, quanta = run_long_under_short_stream(threshold, ran_before=True)
    # It gets the quantum after `threshold` queued steps and a seat once a running short request
    # finishes (2 steps); then 3 prefill chunks and 3 more decode steps. Bound: threshold + 10.
    assert first is not None and finished is not None
    assert threshold <= finished <= threshold + 10
    assert quanta >= 1


def test_a_fresh_request_does_not_count_towards_starvation():
    """Spec 6.4, as the released code: only requests that ran before count, so a fresh long request
    under a stream of shorter ones waits (counting fresh ones collapses LAMPS under overload,
    docs/lamps.md)."""
    assert run_long_under_short_stream(20, ran_before=False) == (None, None, 0)


def test_without_starvation_prevention_the_requeued_long_request_waits_forever():
    assert run_long_under_short_stream(None, ran_before=True) == (None, None, 0)


# ------------------------------------------------------------------ predictions
def test_oracle_predictions_and_injected_error():
    request = make_request("r", 10, call_after=7, max_tokens=20, call_seconds=3.0, result=9)
    exact = SegmentPredictor().predict(request)
    assert exact == SegmentPrediction(output_tokens=7, call_seconds=3.0, result_tokens=9)
    noisy = [SegmentPredictor(relative_error=0.6, seed=s).predict(request) for s in range(200)]
    durations = [p.call_seconds for p in noisy]
    assert min(durations) >= 0 and len(set(durations)) > 150
    assert 2.5 < sum(durations) / len(durations) < 3.5        # unbiased around the truth
    assert all(1 <= p.output_tokens <= 20 for p in noisy)     # clamped to the sampling budget
    assert len({p.output_tokens for p in noisy}) > 10
    assert {p.result_tokens for p in noisy} == {9}             # exact, as the reference's api_return_length


def test_tool_mean_learns_durations_and_result_lengths_online():
    predictor = SegmentPredictor(duration="tool-mean", prior_call_seconds=1.0, prior_result_tokens=16)
    request = make_request("r", 10, call_after=4, max_tokens=20, call_seconds=99.0)
    assert predictor.predict(request).call_seconds == 1.0
    for duration, result in [(2.0, 10), (4.0, 20)]:
        call = Interception(("r", len(request.interceptions)), 0.0, tool="search", end_time=duration,
                            result_tokens=result)
        request.interceptions.append(call)
        predictor.observe(request)
    prediction = predictor.predict(request)
    assert prediction.call_seconds == 3.0                      # not the hint: the tool's mean
    assert prediction.result_tokens == 15
    request.interceptions.append(Interception(("r", 2), 0.0, tool="calc", end_time=0.5, result_tokens=1))
    predictor.observe(request)
    request.hint = dataclasses.replace(request.hint, tool="search")   # the next call's tool, if known
    assert predictor.predict(request) == SegmentPrediction(4, 3.0, 15)
    request.hint = dataclasses.replace(request.hint, tool=None)       # else the last call's
    assert predictor.predict(request) == SegmentPrediction(4, 0.5, 1)
    request.hint = dataclasses.replace(request.hint, tool="never-seen")   # else every call's
    assert predictor.predict(request) == SegmentPrediction(4, pytest.approx(6.5 / 3), round(31 / 3))


def test_predictor_defaults_seed_0_one_second_calls_and_16_token_results():
    request = make_request("r", 10, call_after=7, max_tokens=20, call_seconds=3.0, result=9)
    assert SegmentPredictor(relative_error=0.5).predict(request) == \
        SegmentPredictor(relative_error=0.5, seed=0).predict(request)
    unknown = make_request("u", 10, call_after=7, max_tokens=20)
    assert SegmentPredictor(duration="tool-mean").predict(unknown) == SegmentPrediction(7, 1.0, 16)


def test_injected_error_is_the_standard_deviation_of_the_relative_error():
    request = make_request("r", 10, call_after=7, max_tokens=20, call_seconds=3.0, result=9)
    for error in (0.05, 1.0):
        factors = [SegmentPredictor(relative_error=error, seed=s).predict(request).call_seconds / 3.0
                   for s in range(400)]
        spread = statistics.pstdev(f for f in factors if f > 0)     # the factor is clipped at 0
        assert error / 2 < spread < error * 1.5


def test_predicted_output_never_exceeds_a_budget_of_one_token():
    request = make_request("r", 10, call_after=7, max_tokens=1)
    assert SegmentPredictor().predict(request).output_tokens == 1


def test_a_length_model_predicts_the_output_even_when_the_trigger_is_exact():
    """Trained on short outputs after short contexts and long ones after long contexts, the model
    predicts each request's bin centre (clamped to the sampling budget left), not the trigger's count."""
    predictor = SegmentPredictor(length_model=context_length_model())
    assert predictor.predict(make_request("short", 10, call_after=7, max_tokens=300)).output_tokens == 5
    assert predictor.predict(make_request("long", 1000, call_after=7, max_tokens=300)).output_tokens == 205
    assert predictor.predict(make_request("capped", 1000, call_after=7, max_tokens=100)).output_tokens == 100


def context_length_model() -> LengthModel:
    """Predicts 5 tokens after a 10-token context and 205 after a 1000-token one."""
    features = [SegmentFeatures(10, 0, 0, 0)] * 50 + [SegmentFeatures(1000, 0, 0, 0)] * 50
    return LengthModel.fit(features, [3] * 50 + [200] * 50)


def test_lamps_predicts_with_the_length_model_file_its_options_name(tmp_path):
    path = tmp_path / "lengths.json"
    context_length_model().save(path)
    policy = LampsPolicy(HAND_PROFILE, LampsOptions(length_predictor=str(path)))
    assert policy.predictor.predict(make_request("long", 1000, call_after=7, max_tokens=300)).output_tokens == 205
    assert LampsPolicy(HAND_PROFILE).predictor.length_model is None


def test_lamps_prediction_noise_follows_its_options_error_and_its_seed():
    request = make_request("r", 10, call_after=7, max_tokens=20, call_seconds=3.0, result=9)

    def prediction(**seed):
        return LampsPolicy(HAND_PROFILE, LampsOptions(prediction_error=0.5), **seed).predictor.predict(request)

    assert prediction(seed=3) == prediction(seed=3) != prediction(seed=4)
    assert prediction() == prediction(seed=0)
    assert prediction(seed=3).call_seconds != 3.0
    by_name = [make_policy("lamps", HAND_PROFILE, lamps=LampsOptions(prediction_error=0.5), **seed)
               for seed in ({}, {"seed": 3})]
    assert [p.predictor.predict(request) for p in by_name] == [prediction(seed=0), prediction(seed=3)]


def test_options_are_validated():
    with pytest.raises(ValueError, match="starvation_threshold"):
        LampsOptions(starvation_threshold=0)
    assert LampsOptions(starvation_quantum=1).starvation_quantum == 1        # one step at the front
    with pytest.raises(ValueError, match="starvation_quantum"):
        LampsOptions(starvation_quantum=0)
    with pytest.raises(ValueError, match="duration_predictor"):
        LampsOptions(duration_predictor="psychic")
    with pytest.raises(ValueError, match="prediction_error"):
        LampsOptions(prediction_error=float("nan"))
    with pytest.raises(ValueError, match="prediction_error"):        # a direct user of the predictor too
        SegmentPredictor(relative_error=-0.1)


def test_engine_hints_carry_the_trace_oracle_and_the_tool_name():
    engine = lamps_engine()
    policy = engine.scheduler.policy
    params = SamplingParams(max_tokens=9, ignore_eos=True, temperature=0.0, intercept_after=3)
    rid = engine.add_request([5] * 6, params, hint=SegmentHint(call_duration=2.5, result_tokens=4, tool="qa"))
    assert policy.plans[rid].prediction == SegmentPrediction(output_tokens=3, call_seconds=2.5, result_tokens=4)
    while engine.requests[rid].status is not RequestStatus.PAUSED:
        engine.step()
    call = engine.requests[rid].interceptions[-1]
    assert (call.tool, call.segment_tokens) == ("qa", 3)
    engine.resume(rid, [7] * 4, dataclasses.replace(params, intercept_after=None), SegmentHint())
    assert call.result_tokens == 4
    # the last segment: no call, the 6 tokens of the budget left
    assert policy.plans[rid].prediction == SegmentPrediction(output_tokens=6, call_seconds=None, result_tokens=0)


def test_queue_order_only_reads_and_the_step_advances_once_per_schedule():
    """Counting starvation and granting quanta happen once per step, in `on_running_scheduled`; asking
    for the order again changes nothing."""
    engine = lamps_engine(num_kv_blocks=256, max_num_seqs=1, starvation_threshold=2, starvation_quantum=50)
    lamps = engine.scheduler.policy
    rids = [engine.add_request([5] * 4, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
            for _ in range(3)]
    engine.step()
    engine.scheduler._preempt(engine.requests[rids[0]])     # it ran: queued, its counter runs
    for _ in range(3):
        engine.step()
    def state():
        return lamps._step, lamps.quanta_granted, {rid: (p.front_until, p.queued_since, p.score)
                                                   for rid, p in lamps.plans.items()}

    before = state()
    orders = [[r.request_id for r in lamps.queue_order()] for _ in range(3)]
    assert orders[0] == orders[1] == orders[2]
    assert state() == before
    assert lamps._step == engine.num_steps == 4 and lamps.quanta_granted >= 1
