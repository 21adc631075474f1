"""Offline profiling on a tiny random Llama: the profile is consistent, loads back and drives an LLM;
profiling leaves the engine as it found it; the CLI's `profile` passes its options on and writes the
file. No timing thresholds: times on a shared machine are noise."""
from __future__ import annotations

import jax
import pytest
from flax import nnx

import infercept_jax
from helpers import random_hf_tensors, tiny_spec
from infercept_jax import LLM, SamplingParams
from infercept_jax.cli import build_parser, main
from infercept_jax.profiler import fit_linear, measure_profile, saturation_point
from models.llama import Llama
from models.shapes import SHAPES
from scheduling.profile import HardwareProfile, load_profile

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 2, 7, 11, 3] * 4, [17, 4, 8] * 5]


@pytest.fixture(scope="module")
def model():
    spec = tiny_spec()
    return Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=5))


def make_llm(model, **kw):
    opts = dict(num_kv_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, row_width=8,
                attn_chunk_tokens=8, warmup=False, strict_compile=False, num_host_blocks=64, policy="swap")
    opts.update(kw)
    return LLM.from_model(model, **opts)


@pytest.fixture(scope="module")
def profiled(model):
    llm = make_llm(model)
    return llm, measure_profile(llm, name="tiny", model="tiny-random", quick=True)


def test_profile_is_positive_and_consistent(model, profiled):
    llm, p = profiled
    assert (p.name, p.model, p.block_size) == ("tiny", "tiny-random", 4)
    assert p.kv_bytes_per_token == llm.runner.spec.kv_bytes_per_token(4)   # float32
    assert p.fwd_ms_per_token >= 0 and p.fwd_base_ms >= 0 and p.fwd_seconds(p.saturation_tokens) > 0
    assert p.saturation_tokens in llm.runner.chunk_buckets and p.saturation_tokens <= 64
    assert p.swap_out_gb_per_s > 0 and p.swap_in_gb_per_s > 0
    slower = min(p.swap_out_gb_per_s, p.swap_in_gb_per_s) * 1e9
    assert p.swap_limit_tokens > 0
    assert p.swap_limit_tokens == pytest.approx(
        p.fwd_seconds(p.saturation_tokens) * slower / p.kv_bytes_per_token)
    assert (p.num_device_blocks, p.num_host_blocks) == (256, 64)
    assert p.device
    assert p.num_gpus == 1
    assert p.weights_gb == pytest.approx(sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / 1e9)


def test_profiling_gives_back_every_block_and_leaves_generation_unchanged(model, profiled):
    llm, _ = profiled
    blocks = llm.engine.blocks
    blocks.check_invariants()
    assert blocks.num_free == blocks.device.capacity and blocks.host.num_free == blocks.host.capacity
    fresh = make_llm(model)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == \
           [o.token_ids for o in fresh.generate(PROMPTS, GREEDY)]


def test_profile_round_trips_through_json_and_drives_an_llm(model, profiled, tmp_path):
    _, p = profiled
    path = tmp_path / "profile.json"
    p.to_json(path)
    assert HardwareProfile.from_json(path) == p
    assert load_profile(str(path)) == p
    llm = make_llm(model, policy="infercept", profile=str(path))
    assert all(len(o.token_ids) == 8 for o in llm.generate(PROMPTS, GREEDY))


def test_saturation_point_is_where_throughput_stops_growing():
    flat_then_linear = {16: 10.0, 32: 10.0, 64: 10.0, 128: 16.0, 256: 32.0, 384: 48.0}
    assert saturation_point(flat_then_linear) == 128
    never_saturates = {16: 10.0, 64: 10.0, 384: 10.0}
    assert saturation_point(never_saturates) == 384
    linear_from_the_start = {16: 2.0, 64: 8.0, 384: 48.0}
    assert saturation_point(linear_from_the_start) == 16


def test_fit_linear_recovers_a_line_and_never_gives_a_negative_intercept():
    a, c = fit_linear({x: 0.5 * x + 3.0 for x in (16, 32, 64, 128)})
    assert (a, c) == (pytest.approx(0.5), pytest.approx(3.0))
    a, c = fit_linear({16: 1.0, 32: 5.0, 64: 13.0})   # a free fit: 0.25 x - 3
    assert c == 0.0 and a == pytest.approx(1008 / 5376)   # through the origin: sum(xy) / sum(x^2)


def test_profiling_needs_a_host_pool(model):
    with pytest.raises(ValueError, match="no host KV pool"):
        measure_profile(make_llm(model, policy="preserve"), quick=True)


def test_cli_profile_options_parse():
    args = build_parser().parse_args(["profile", "--out", "p.json", "--quick", "--dtype", "bfloat16",
                                      "--max-num-batched-tokens", "256", "--kv-cache-gb", "0.5"])
    assert (args.out, args.quick, args.dtype, args.max_num_batched_tokens, args.kv_cache_memory_gb) == \
           ("p.json", True, "bfloat16", 256, 0.5)
    assert (args.model, args.repeats, args.block_size, args.swap_space_gb) == ("smollm2-135m", 5, None, None)


def test_cli_profile_passes_its_options_and_writes_the_file(model, tmp_path, monkeypatch, capsys):
    built = {}

    def tiny_llm(name, **options):
        built.update(options, name=name)
        return make_llm(model, **options)

    monkeypatch.setattr(infercept_jax, "LLM", tiny_llm)
    path = tmp_path / "profile.json"
    assert main(["profile", "--model", "tiny", "--out", str(path), "--quick",
                 "--max-num-batched-tokens", "32", "--dtype", "float32"]) == 0
    assert built == {"name": "tiny", "policy": "swap", "dtype": "float32", "max_num_batched_tokens": 32}
    p = HardwareProfile.from_json(path)
    assert (p.name, p.model) == ("tiny-measured", "tiny") and p.saturation_tokens <= 32
    assert str(path) in capsys.readouterr().out


def test_cli_profiles_random_weights_of_a_named_shape(tmp_path, capsys):
    """`--shape`: a machine without the model's weights (a GPU box without a registry) still gets
    the model's profile: timings depend on its sizes, not on the weights' values."""
    path = tmp_path / "profile.json"
    assert main(["profile", "--shape", "tiny", "--out", str(path), "--quick", "--max-num-batched-tokens", "16",
                 "--max-num-seqs", "2", "--max-model-len", "128", "--kv-cache-gb", "0.01", "--swap-space-gb", "0.01"]) == 0
    p = HardwareProfile.from_json(path)
    assert (p.name, p.model) == ("tiny-measured", "tiny shape, random weights, float32")
    assert p.kv_bytes_per_token == SHAPES["tiny"].kv_bytes_per_token(4)
    assert p.weights_gb == pytest.approx(sum(x.nbytes for x in jax.tree.leaves(nnx.state(Llama(SHAPES["tiny"])))) / 1e9)
    assert "<a tiny model>" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["profile", "--model", "smollm2-135m", "--shape", "tiny"])
