"""Async scheduling: the engine launches step N+1 before it collects step N, and a request sampled in
step N holds a placeholder that the runner reads on the device. It must change when things happen,
never what is generated."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FakeRunner, engine_with, random_hf_tensors, tiny_spec
from infercept_jax import LLM, SamplingParams
from infercept_jax.experiments.simulator import simulated_engine
from models.llama import Llama
from scheduling.policies import POLICIES
from scheduling.profile import load_profile
from scheduling.request import PLACEHOLDER_TOKEN
from test_interception_stateful import PROFILE


def serve(engine, prompts, params, abort_at: dict[int, int] | None = None):
    """Run `prompts` to the end, resuming each pause two steps later with three tokens, aborting
    request i once it has `abort_at[i]` tokens; returns each request's (tokens, finish reason).
    Every output keeps the tokens it had when it was made (it shares the request's token list)."""
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    abort_at = {ids[i]: n for i, n in (abort_at or {}).items()}
    waiting, done, seen = {}, {}, []
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            seen.append((out, out.token_ids))
            assert PLACEHOLDER_TOKEN not in out.token_ids, out
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason)
            elif out.paused:
                waiting[out.request_id] = 2
            elif out.request_id in abort_at and out.num_generated_tokens >= abort_at[out.request_id]:
                aborted = engine.abort(out.request_id)
                seen.append((aborted, aborted.token_ids))
                assert PLACEHOLDER_TOKEN not in aborted.token_ids
                done[out.request_id] = (aborted.token_ids, aborted.finish_reason)
        for rid in list(waiting):
            waiting[rid] -= 1
            if not waiting[rid]:
                out = engine.resume(rid, [3, 4, 5])
                seen.append((out, out.token_ids))
                if out.finished:        # the result filled the context
                    done[rid] = (out.token_ids, out.finish_reason)
                del waiting[rid]
    assert not engine.has_unfinished(), "the requests did not finish in 2000 steps"
    assert all(out.token_ids == tokens for out, tokens in seen)
    blocks = engine.blocks
    assert (blocks.device.num_free, blocks.host.num_free) == (blocks.device.capacity, blocks.host.capacity)
    return [done[rid] for rid in ids]


def workload(seed: int):
    """Prompts of 1-60 tokens; sampled, seeded, stopping at token 7 or max_tokens, pausing every 5."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, 250, int(n)).tolist() for n in rng.integers(1, 60, 10)]
    params = [SamplingParams(max_tokens=int(m), temperature=0.8, seed=i, stop_token_ids=[7], intercept_after=5)
              for i, m in enumerate(rng.integers(5, 25, len(prompts)))]
    return prompts, params


@pytest.fixture(scope="module")
def llm():
    """InferCept on a pool of 60 blocks of 4 tokens for 6 sequences of up to 128: it preempts,
    swaps and discards."""
    spec = tiny_spec()
    return LLM.from_model(Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=3)), None, policy="infercept",
                          num_kv_blocks=60, block_size=4, num_host_blocks=64, max_num_seqs=6,
                          max_num_batched_tokens=32, max_model_len=128, compile_cache=False, warmup=False,
                          strict_compile=False)


def test_the_same_tokens_as_one_step_at_a_time(llm):
    engine = llm.engine
    prompts, params = workload(7)
    engine.async_scheduling = False
    one_at_a_time = serve(engine, prompts, params)
    preemptions = engine.waste.preemptions
    steps = engine.num_steps
    engine.async_scheduling = True
    overlapped = serve(engine, prompts, params)
    assert overlapped == one_at_a_time
    assert engine.waste.preemptions > preemptions > 0          # the edge where a sampled request is preempted
    assert engine.waste.swap_out_blocks and engine.scheduler.num_discards
    assert engine.num_steps - steps > steps                     # it launched steps it then threw away


def test_an_abort_while_the_request_is_in_flight(llm):
    engine = llm.engine
    prompts, params = workload(11)
    engine.async_scheduling = False
    want = serve(engine, prompts, params, abort_at={2: 3, 5: 1})
    engine.async_scheduling = True
    got = serve(engine, prompts, params, abort_at={2: 3, 5: 1})
    assert got == want
    assert got[2][1] == got[5][1] == "abort"


def test_a_runner_that_only_executes_is_refused():
    with pytest.raises(ValueError, match="async_scheduling needs a runner that launches"):
        simulated_engine(load_profile("a100-gptj-6b"), "infercept", async_scheduling=True)


class FakeOverlappingRunner(FakeRunner):
    """FakeRunner's tokens, drawn when the step is launched and handed out when it is collected."""

    def launch(self, output):
        return self.execute(output)

    def collect(self, launched):
        return launched


@pytest.mark.parametrize("overlap", [False, True])
def test_a_request_preempted_and_refilled_in_flight_then_paused_holds_no_blocks(overlap):
    """Under async scheduling a request sampled in step N can be preempted while step N+1 is
    scheduled and given its first chunk again in it; when step N's token pauses it, the engine takes
    that chunk back and it holds blocks with nothing computed. Resumed, it went to the waiting queue
    with them, where nothing takes blocks back, and the oldest request, short of them, preempted
    itself every step: a livelock. The workload is one hypothesis found; the same in sync mode."""
    now = [0.0]
    engine = engine_with(FakeOverlappingRunner(), "preserve", profile=PROFILE, num_kv_blocks=9, num_host_blocks=4,
                         max_model_len=64, max_num_seqs=4, clock=lambda: now[0], async_scheduling=overlap)
    adds = {1: (24, 24, 1), 4: (17, 28, None), 6: (16, 26, 3), 7: (12, 15, 1)}   # step: prompt, max_tokens, every
    resumes = {"req-0": (3, 7), "req-3": (5, 0), "req-2": (4, 8)}                 # steps after a pause, result tokens
    due = {}
    for step in range(500):
        now[0] += 0.5
        if step in adds:
            n, m, every = adds[step]
            engine.add_request([5] * n, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True,
                                                       intercept_after=every))
            now[0] += 0.01
        for out in engine.step():
            if out.paused and out.request_id in resumes:
                due[out.request_id] = step + resumes[out.request_id][0]
        for rid, at in list(due.items()):
            if at == step:
                del due[rid]
                engine.resume(rid, [7] * resumes[rid][1])
        assert all(engine.blocks.num_blocks_of(r.request_id) == 0 for r in engine.scheduler.waiting), step
        if step > 10 and not engine.has_unfinished():
            break
    assert not engine.has_unfinished()


@settings(deadline=None, max_examples=300, print_blob=True)
@given(policy=st.sampled_from(POLICIES), device_blocks=st.integers(8, 24), budget=st.integers(4, 16),
       requests=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 16), st.none() | st.integers(1, 5),
                                   st.none() | st.integers(0, 12)), min_size=1, max_size=8))
def test_every_policy_makes_the_same_tokens_overlapped(policy, device_blocks, budget, requests):
    """Without a model, thousands of schedules: tool calls, aborts, preemptions, swaps, discards."""
    runs = []
    for overlap in (False, True):
        engine = engine_with(FakeOverlappingRunner(), policy, num_kv_blocks=device_blocks, num_host_blocks=8,
                             max_num_batched_tokens=budget, max_num_seqs=4, async_scheduling=overlap,
                             heuristic="H-S", estimator="oracle" if policy == "heuristic" else None)
        prompts = [list(range(2, 2 + n)) for n, *_ in requests]
        params = [SamplingParams(max_tokens=m, intercept_after=every) for _, m, every, _ in requests]
        aborts = {i: at for i, (*_, at) in enumerate(requests) if at is not None}
        runs.append((serve(engine, prompts, params, aborts), engine.waste.preemptions))
    assert runs[1][0] == runs[0][0]
