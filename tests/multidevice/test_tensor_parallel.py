"""Tensor parallelism on CPU devices: a process started by tests/test_multidevice.py with
`--xla_force_host_platform_device_count=4` (the count must be set before JAX starts)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import count_compiles, paged_logits, paused_run, random_hf_tensors, tiny_spec
from infercept_jax import LLM, SamplingParams
from infercept_jax.parallel import kv_pool_sharding, tp_mesh
from infercept_jax.profiler import measure_profile
from kvcache.swap import make_host_pool
from models.llama import PARAM_SPECS, Llama

# GQA with 4 KV heads of 2 query heads each: TP 2 gives each device 2 KV heads, TP 4 one.
SPEC = tiny_spec(num_heads=8, num_kv_heads=4, head_dim=8)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 60))]


def test_the_process_has_four_devices():
    assert jax.device_count() == 4


@pytest.mark.parametrize("tp, tied", [(2, False), (4, True)], ids=["tp2-untied-head", "tp4-tied-head"])
def test_logits_match_one_device(tp, tied):
    spec = tiny_spec(tied, num_heads=8, num_kv_heads=4, head_dim=8)
    tensors = random_hf_tensors(spec, seed=1)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, 45).tolist()
    one = paged_logits(Llama.from_hf_weights(spec, tensors), ids)
    mesh = tp_mesh(tp)
    model = Llama.from_hf_weights(spec, tensors, mesh=mesh)
    wqkv = model.wqkv[...]
    assert wqkv.sharding.spec == PARAM_SPECS["wqkv"]
    assert {s.data.shape[2] for s in wqkv.addressable_shards} == {spec.num_kv_heads // tp}
    split = paged_logits(model, ids, pool_sharding=kv_pool_sharding(mesh))
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-5)


def test_the_pallas_kernel_runs_per_device_on_its_own_heads():
    """Under tensor parallelism the kernel runs in a shard_map: each device its own KV heads."""
    tensors = random_hf_tensors(SPEC, seed=2)
    ids = np.random.default_rng(1).integers(0, SPEC.vocab_size, 30).tolist()
    one = paged_logits(Llama.from_hf_weights(SPEC, tensors), ids, block_size=4)
    mesh = tp_mesh(2)
    split = paged_logits(Llama.from_hf_weights(SPEC, tensors, mesh=mesh), ids, block_size=4,
                         pool_sharding=kv_pool_sharding(mesh), attention="pallas")
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def engines() -> dict[int, LLM]:
    """A swapping engine per TP size, on pools small enough to need the host."""
    tensors = random_hf_tensors(SPEC, seed=3)
    return {tp: LLM.from_model(Llama.from_hf_weights(SPEC, tensors, mesh=tp_mesh(tp)), None, tensor_parallel_size=tp,
                               policy="swap", num_kv_blocks=40, block_size=4, num_host_blocks=40, max_num_seqs=4,
                               max_num_batched_tokens=16, max_model_len=128, compile_cache=False)
            for tp in (1, 2, 4)}


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, intercept_after=4),
                                    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7, max_tokens=16,
                                                   ignore_eos=True, intercept_after=4)],
                         ids=["greedy", "sampled"])
def test_tokens_equal_one_device_through_swaps_without_compiling(engines, params):
    one = paused_run(engines[1], PROMPTS, params)
    for tp in (2, 4):
        llm = engines[tp]
        swaps = llm.engine.waste.swap_out_blocks, llm.engine.waste.swap_in_blocks
        with count_compiles() as compiles:
            assert paused_run(llm, PROMPTS, params) == one, tp
        assert llm.engine.waste.swap_out_blocks > swaps[0] and llm.engine.waste.swap_in_blocks > swaps[1]
        assert compiles == [], compiles


@pytest.mark.parametrize("transfer", ["numpy", "pinned_host"])
def test_swap_round_trip_is_exact_per_shard(transfer):
    mesh = tp_mesh(4)
    sharding = kv_pool_sharding(mesh)
    shape = (2, 12, 4, 4, 8)
    rng = np.random.default_rng(0)
    k, v = (jax.device_put(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16), sharding) for _ in range(2))
    host = make_host_pool(2, 10, 4, 4, 8, jnp.bfloat16, sharding=sharding, max_blocks_per_copy=4, transfer=transfer)
    if transfer == "numpy":
        assert [part.shape for part in host.k] == [(2, 10, 4, 1, 8)] * 4     # each device's KV head only
    out_pairs = [(3, 0), (5, 7), (6, 2), (9, 9), (11, 1)]
    host.copy_out(k, v, out_pairs)
    host.land()
    in_pairs = [(0, 1), (7, 2), (2, 4), (9, 7), (1, 8)]
    zeros = jax.device_put(jnp.zeros(shape, jnp.bfloat16), sharding)
    k2, v2 = host.copy_in(zeros, jax.device_put(jnp.zeros(shape, jnp.bfloat16), sharding), in_pairs)
    assert k2.sharding == sharding
    if transfer == "pinned_host":       # each device's KV head only, in pinned host memory
        pinned = [array for array, _ in host._where.values()]
        assert {s.data.shape for a in pinned for s in a.k.addressable_shards} <= {(2, 4, 4, 1, 8), (2, 1, 4, 1, 8)}
        assert {a.k.sharding for a in pinned} == {sharding.with_memory_kind("pinned_host")}
    for (src, _), (_, dst) in zip(out_pairs, in_pairs):
        assert np.array_equal(np.asarray(k2[:, dst]), np.asarray(k[:, src]))
        assert np.array_equal(np.asarray(v2[:, dst]), np.asarray(v[:, src]))


_COLLECTIVE = re.compile(r"= \w+\[([\d,]*)\][^ ]* (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(.*op_name=\"([^\"]*)\"")


def test_the_step_moves_activations_never_weights_or_pools(engines):
    """Megatron's collectives only: two all-reduces of [T, D] per layer (after o and after down),
    and nothing bigger than the step's activations or its logits anywhere in the step."""
    runner = engines[4].runner
    for shape, compiled in runner._compiled.items():
        found = [(m.group(2), int(np.prod([int(d) for d in m.group(1).split(",") if d])), m.group(3))
                 for m in _COLLECTIVE.finditer(compiled.as_text())]
        per_layer = [kind for kind, _, op in found if "while/body" in op and kind != "all-reduce"]
        layer_reduces = [size for kind, size, op in found if "while/body" in op and kind == "all-reduce"]
        assert per_layer == [] and layer_reduces == [shape.num_tokens * SPEC.hidden_size] * 2, (shape, found)
        largest = max(shape.num_tokens * SPEC.hidden_size, shape.num_samples * SPEC.vocab_size)
        assert all(size <= largest for _, size, _ in found), (shape, found)


def test_the_logits_stay_split_by_vocabulary(engines):
    """The step hands its logits to a draw as the head made them, split by vocabulary: a greedy
    step, which needs only their argmax, gathers none of them."""
    runner = engines[4].runner
    split = P(None, "tp")
    assert {compiled.output_shardings[1].spec for compiled in runner._compiled.values()} == {split}
    assert runner.compile_draw(4, True).input_shardings[0][0].spec == split


def test_a_model_that_does_not_split_is_refused():
    spec = tiny_spec(num_heads=6, num_kv_heads=3, head_dim=8)
    model = Llama.from_hf_weights(spec, random_hf_tensors(spec))
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide the model's 3 KV heads"):
        LLM.from_model(model, None, tensor_parallel_size=2, num_kv_blocks=8, compile_cache=False, warmup=False)
    with pytest.raises(ValueError, match="needs 8 devices; this run has 4"):
        tp_mesh(8)


def test_a_profile_measured_on_a_split_engine_describes_the_whole_model(engines):
    """Like the paper's 13B TP2 profile: M is the whole model's KV bytes per token (the swap copies
    of all shards together move them), and the device names the mesh."""
    llm = engines[2]
    profile = measure_profile(llm, name="tiny-tp2", model="tiny-random", quick=True)
    assert profile.device.startswith("2 x ") and profile.device.endswith("(cpu)")
    assert profile.kv_bytes_per_token == SPEC.kv_bytes_per_token(4)
    one_device = Llama.from_hf_weights(SPEC, random_hf_tensors(SPEC, seed=3))
    assert profile.num_gpus == 2
    assert profile.weights_gb == pytest.approx(sum(x.nbytes for x in jax.tree.leaves(nnx.state(one_device))) / 1e9)
    assert profile.swap_out_gb_per_s > 0 and profile.swap_in_gb_per_s > 0
    assert profile.num_device_blocks == 40 and profile.saturation_tokens in llm.runner.chunk_buckets
    blocks = llm.engine.blocks
    assert blocks.num_free == blocks.device.capacity and blocks.host.num_free == blocks.host.capacity


def test_memory_options_are_per_device():
    """kv_cache_memory_gb buys twice the blocks when the pools are split over two devices."""
    block_gb = SPEC.kv_bytes_per_token(4) * 4 / 2**30
    model = Llama.from_hf_weights(SPEC, random_hf_tensors(SPEC))
    sizes = {}
    for tp in (1, 2):
        llm = LLM.from_model(model, None, tensor_parallel_size=tp, policy="preserve", block_size=4,
                             kv_cache_memory_gb=100 * block_gb, warmup=False, compile_cache=False)
        sizes[tp] = llm.engine.blocks.device.num_blocks
    assert sizes == {1: 100, 2: 200}
