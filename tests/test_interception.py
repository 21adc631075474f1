"""Interception on a tiny random Llama: pause/resume, policies, swap round trips, bad resumes."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import count_compiles, random_hf_tensors, tiny_spec
from infercept_jax import LLM, SamplingParams
from kvcache.block_manager import BlockManager
from kvcache import swap
from kvcache.swap import make_host_pool, piece_sizes
from models.llama import Llama
from scheduling.policies import POLICIES
from scheduling.profile import HardwareProfile
from scheduling.request import SegmentHint

EVERY, CALLS, RESULT_LEN = 5, 2, 6


@pytest.fixture(scope="module")
def model():
    spec = tiny_spec()
    return Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=3))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    """A profile that makes the infercept policy swap and discard on this tiny pool: a small
    swap limit (a few blocks per step) and a forward time comparable to the 1 s clock ticks."""
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    HardwareProfile(name="tiny", fwd_ms_per_token=20.0, fwd_base_ms=100.0, saturation_tokens=16,
                    swap_limit_tokens=24.0, kv_bytes_per_token=512, block_size=4).to_json(path)
    return str(path)


def make_llm(model, policy="preserve", **kw):
    opts = dict(num_kv_blocks=24, num_host_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                row_width=8, attn_chunk_tokens=8, warmup=False, strict_compile=False, policy=policy,
                estimator="oracle")
    opts.update(kw)
    llm = LLM.from_model(model, **opts)
    clock = llm.engine.clock = Clock()
    execute = llm.runner.execute

    def one_second_step(output):
        clock.now += 1.0
        return execute(output)

    llm.runner.execute = one_second_step
    return llm


def result_tokens(index: int, call: int) -> list[int]:
    return [(7 * index + 13 * call + t) % 200 + 2 for t in range(RESULT_LEN)]


def run_intercepted(llm, prompts, max_steps=2000):
    """Each request pauses every EVERY tokens, CALLS times; the calls of request i last 1 + 3*(i % 3)
    clock seconds (a step takes one) and return `result_tokens(i, call)`. Returns the outputs."""
    engine, clock = llm.engine, llm.engine.clock
    ids = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=EVERY * (CALLS + 1), temperature=0.0, ignore_eos=True,
                                intercept_after=EVERY, max_interceptions=CALLS)
        ids.append(engine.add_request(p, params, hint=SegmentHint(call_duration=1.0 + 3 * (i % 3))))
    due, done = {}, {}
    for _ in range(max_steps):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
            elif out.paused:
                due[out.request_id] = clock.now + out.interception.expected_duration
        if not engine.has_work():
            clock.now += 1.0
        for rid, at in list(due.items()):
            if clock.now >= at:
                i, call = ids.index(rid), engine.requests[rid].interceptions[-1].key[1]
                engine.resume(rid, result_tokens(i, call))
                del due[rid]
        engine.blocks.check_invariants()
        if len(done) == len(ids):
            break
    assert len(done) == len(ids), "requests did not finish"
    assert engine.blocks.num_free == engine.blocks.device.capacity
    assert engine.blocks.host.num_free == engine.blocks.host.capacity
    return [done[rid] for rid in ids]


def prompts(n, seed=0, lo=6, hi=20):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 256, rng.integers(lo, hi)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def reference(model):
    """Greedy outputs with the tool results in the prompt: for every segment of every request, the
    prompt + everything before the segment, generated without interception."""
    ps = prompts(6)
    outs = run_intercepted(make_llm(model, num_kv_blocks=200), ps)
    contexts, expected = [], []
    for p, out in zip(ps, outs):
        tokens = out.token_ids
        assert len(tokens) == EVERY * (CALLS + 1) + RESULT_LEN * CALLS
        for seg in range(CALLS + 1):
            start = seg * (EVERY + RESULT_LEN)
            contexts.append(p + tokens[:start])
            expected.append(tokens[start:start + EVERY])
    plain = make_llm(model, num_kv_blocks=200).generate(
        contexts, SamplingParams(max_tokens=EVERY, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in plain] == expected
    return ps, [o.token_ids for o in outs]


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_do_not_change_greedy_results(model, reference, profile_path, policy):
    ps, expected = reference
    llm = make_llm(model, policy=policy, profile=profile_path)
    outs = run_intercepted(llm, ps)
    assert [o.token_ids for o in outs] == expected
    assert all(o.num_generated_tokens == EVERY * (CALLS + 1) and o.num_interceptions == CALLS for o in outs)
    waste = llm.engine.waste.summary()
    if policy in ("swap", "infercept"):
        assert waste["swap_out_blocks"] > 0 and waste["swap_in_blocks"] > 0
    if policy in ("discard", "improved-discard"):
        assert waste["recompute_tokens"] > 0
    if policy == "preserve":
        assert waste["swap_out_blocks"] == 0 and waste["waste_preserve_pct"] > 0


def test_infercept_discards_and_swaps_within_the_budget(model, profile_path):
    llm = make_llm(model, policy="infercept", profile=profile_path)
    engine = llm.engine
    budgets = []
    schedule = engine.scheduler.schedule

    def recording_schedule(now):
        out = schedule(now)
        budgets.append((len(out.swap_in), len(out.swap_out)))
        return out

    engine.scheduler.schedule = recording_schedule
    run_intercepted(llm, prompts(6))
    # N(S) = 24 tokens = 6 blocks of 4 per step, shared between the two directions
    assert max(i + o for i, o in budgets) <= 6
    assert engine.scheduler.num_discards + engine.waste.swap_out_blocks > 0


@pytest.mark.parametrize("transfer", ["pinned_host", "numpy"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swap_round_trip_is_bit_exact(dtype, transfer):
    rng = np.random.default_rng(0)
    shape = (2, 12, 4, 2, 8)
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    host = make_host_pool(2, 10, 4, 2, 8, dtype, max_blocks_per_copy=4, transfer=transfer)
    assert host.transfer == transfer
    out_pairs = [(3, 0), (5, 7), (6, 2), (9, 9), (11, 1), (4, 3), (8, 5)]   # 7 blocks: 4 + 2 + 1
    host.copy_out(k, v, out_pairs)
    host.land()
    in_pairs = [(0, 1), (7, 2), (2, 4), (9, 7), (1, 8), (3, 6), (5, 10)]
    k2, v2 = host.copy_in(jnp.zeros_like(k), jnp.zeros_like(v), in_pairs)
    for (src, _), (_, dst) in zip(out_pairs, in_pairs):
        assert np.array_equal(np.asarray(k2[:, dst]), np.asarray(k[:, src]))
        assert np.array_equal(np.asarray(v2[:, dst]), np.asarray(v[:, src]))


def test_copies_are_made_in_power_of_two_pieces_largest_first():
    assert piece_sizes(13, [1, 2, 4, 8]) == [8, 4, 1]
    assert piece_sizes(21, [1, 2, 4, 8]) == [8, 8, 4, 1]
    assert piece_sizes(0, [1, 2]) == []


def test_pinned_pieces_are_capped_in_bytes_so_a_partial_swap_in_moves_little(monkeypatch):
    """A swap-in moves a pinned piece whole: pieces stay within PINNED_PIECE_BYTES on each device.
    The numpy pool copies only the blocks asked for and keeps its pieces."""
    block_bytes = 2 * 2 * 4 * 2 * 8 * 4            # K and V, 2 layers, 4 tokens, 2 KV heads, head_dim 8, float32
    assert swap.pinned_piece_blocks(block_bytes, 64) == 64                       # 64 blocks are 64 KiB
    monkeypatch.setattr(swap, "PINNED_PIECE_BYTES", 4 * block_bytes)             # a piece may reach the cap
    assert swap.pinned_piece_blocks(block_bytes, 64) == 4
    assert swap.pinned_piece_blocks(block_bytes, 2) == 2
    assert swap.pinned_piece_blocks(5 * block_bytes, 64) == 1                   # a block over the cap still moves
    assert make_host_pool(2, 10, 4, 2, 8, jnp.float32, max_blocks_per_copy=64, transfer="pinned_host").buckets \
        == [1, 2, 4]
    assert make_host_pool(2, 10, 4, 2, 8, jnp.float32, max_blocks_per_copy=64, transfer="numpy").buckets[-1] == 64


def test_the_pinned_pool_lets_go_of_an_array_when_none_of_its_blocks_is_held():
    """Five blocks go out as pieces of 4 and 1; swapping the piece of 4 in part, overwriting one
    of its blocks by a later swap-out and releasing the others frees it; then the later ones go."""
    k = jnp.arange(2 * 8 * 4 * 2 * 8, dtype=jnp.float32).reshape(2, 8, 4, 2, 8)
    host = make_host_pool(2, 10, 4, 2, 8, jnp.float32, max_blocks_per_copy=4, transfer="pinned_host")
    host.copy_out(k, k, [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)])
    assert host.num_arrays == 0            # started, not landed
    host.land()
    assert host.num_arrays == 2
    k2, _ = host.copy_in(jnp.zeros_like(k), jnp.zeros_like(k), [(0, 6), (1, 7)])
    assert np.array_equal(np.asarray(k2[:, 6:8]), np.asarray(k[:, 1:3]))
    host.copy_out(k, k, [(6, 2)])          # host block 2 gets new content
    host.land()
    host.release([0, 1, 4])                # swapped in, or freed with its request
    assert host.num_arrays == 2            # host block 3 still holds the piece of 4
    host.release([3])
    assert host.num_arrays == 1
    k3, _ = host.copy_in(jnp.zeros_like(k), jnp.zeros_like(k), [(2, 5)])
    assert np.array_equal(np.asarray(k3[:, 5]), np.asarray(k[:, 6]))
    host.release([2])
    assert host.num_arrays == 0


def test_partial_swaps_keep_block_tables_consistent():
    bm = BlockManager(12, block_size=4, num_host_blocks=6)
    bm.ensure("a", 30)                       # 8 blocks
    table = list(bm.tables["a"])
    out1 = bm.swap_out("a", 3)               # the last 3 go first
    assert [d for d, _ in out1] == table[5:]
    out2 = bm.swap_out("a", 2)
    assert [d for d, _ in out2] == table[3:5]
    assert bm.host_tables["a"] == [h for _, h in out2] + [h for _, h in out1]   # logical order kept
    bm.check_invariants()
    back = bm.swap_in("a", 4)                # from the front
    assert [h for h, _ in back] == [h for _, h in out2] + [h for _, h in out1][:2]
    assert bm.num_blocks_of("a") == 7 and bm.num_host_blocks_of("a") == 1
    with pytest.raises(RuntimeError, match="host pool"):
        bm.ensure("a", 40)
    bm.check_invariants()
    bm.free("a")
    assert bm.num_free == 11 and bm.host.num_free == 6
    bm.check_invariants()


def test_resume_errors_leave_the_engine_serving(model):
    llm = make_llm(model)
    engine = llm.engine
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, intercept_after=3, max_interceptions=1)
    rid = engine.add_request(prompts(1)[0], p)
    with pytest.raises(KeyError, match="unknown request id"):
        engine.resume("nope", [5])
    with pytest.raises(ValueError, match="not paused"):
        engine.resume(rid, [5])
    paused = None
    while paused is None:
        paused = next((o for o in engine.step() if o.paused), None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.resume(rid, [5, 10**6])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.resume(rid, "text")
    assert engine.requests[rid].status.value == "paused"
    engine.resume(rid, [5, 6, 7])
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].num_generated_tokens == 12
    with pytest.raises(ValueError, match="not paused"):
        engine.resume(rid, [5])
    assert engine.blocks.num_free == engine.blocks.device.capacity


def test_a_result_longer_than_the_context_is_truncated_and_finishes(model):
    llm = make_llm(model, max_model_len=40)
    engine = llm.engine
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, intercept_after=3)
    rid = engine.add_request(prompts(1, lo=10, hi=11)[0], p)
    other = engine.add_request(prompts(1, seed=1)[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    while not engine.requests[rid].status.value == "paused":
        engine.step()
    out = engine.resume(rid, [9] * 100)
    assert out.finished and out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 40
    while engine.has_unfinished():
        engine.step()
    assert engine.requests[other].num_generated_tokens == 12
    assert engine.blocks.num_free == engine.blocks.device.capacity


@pytest.mark.parametrize("transfer", ["numpy", "pinned_host"])
def test_abort_of_a_paused_or_swapped_request_frees_both_pools(model, transfer):
    """The pinned pool lets go of the aborted request's arrays with the next step."""
    llm = make_llm(model, policy="swap", swap_transfer=transfer)
    engine, host = llm.engine, llm.runner.host_pool
    p = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, intercept_after=4)
    rid = engine.add_request(prompts(1, lo=18, hi=19)[0], p)
    while not engine.requests[rid].status.value == "paused":
        engine.step()
    engine.step()                                       # the swap-out happens in the next step
    assert engine.blocks.num_host_blocks_of(rid) > 0 and engine.blocks.num_blocks_of(rid) == 0
    engine.abort(rid)
    assert engine.blocks.num_free == engine.blocks.device.capacity
    assert engine.blocks.host.num_free == engine.blocks.host.capacity
    engine.blocks.check_invariants()
    if transfer == "pinned_host":
        assert host.num_arrays > 0
        llm.generate(prompts(1)[0], SamplingParams(max_tokens=2))
        assert host.num_arrays == 0


@pytest.mark.parametrize("policy, transfer", [("swap", "numpy"), ("infercept", "numpy"), ("infercept", "pinned_host")])
def test_swaps_do_not_compile_after_warmup(model, profile_path, policy, transfer):
    llm = make_llm(model, policy=policy, profile=profile_path, warmup=True, strict_compile=True,
                   swap_transfer=transfer)
    with count_compiles() as compiles:
        run_intercepted(llm, prompts(6))
    assert llm.engine.waste.swap_out_blocks > 0
    assert compiles == []


@pytest.mark.parametrize("policy", ["swap", "infercept"])
def test_the_pinned_pool_serves_the_same_tokens_and_holds_nothing_once_all_finish(model, reference, profile_path,
                                                                                 policy):
    ps, expected = reference
    llm = make_llm(model, policy=policy, profile=profile_path, swap_transfer="pinned_host")
    assert [o.token_ids for o in run_intercepted(llm, ps)] == expected
    assert llm.engine.waste.swap_in_blocks > 0
    assert llm.runner.host_pool.num_arrays == 0
