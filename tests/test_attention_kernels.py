"""The Pallas paged-attention kernel (kvcache/pallas_attention.py) against the XLA path it replaces
on GPU: run in Pallas's interpreter here, and lowered for CUDA to check that Triton takes it."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import paused_run, random_hf_tensors, tiny_spec
from infercept_jax import LLM, SamplingParams
from infercept_jax.config import EngineConfig
from infercept_jax.llm import for_backend
from infercept_jax.model_runner import Packing, check_attention_kernel
from infercept_jax.parallel import tp_mesh
from kvcache import pallas_attention
from kvcache.paged import AttentionInputs, RowGroup, _attend_rows, paged_attention
from models.llama import Llama
from scheduling.scheduler import SchedulerOutput


def ragged_step(rng, num_kv_heads: int, group: int, head_dim: int, dtype, block_size: int = 4,
                chunk_pages: int = 4):
    """Random pools and a step with a decode group (two decodes and a padding row) beside a chunk
    group (a prompt's chunk that ends mid-page, a chunk starting far into its context, a padding row).
    Pages are scattered over the pool, in layer 1 of 2. The kernel reads 16 keys per iteration
    (`chunk_pages` pages): Triton's dot wants at least 16 on each side."""
    num_blocks, width, table_width = 64, 4, 16
    pools = [jnp.asarray(rng.normal(size=(2, num_blocks, block_size, num_kv_heads, head_dim)), dtype) for _ in "kv"]
    tables = [rng.permutation(np.arange(1, num_blocks))[:table_width].astype(np.int32) for _ in range(4)]
    # (tokens of the row, first position): decodes at 0 and 37, chunks 0..2 and 41..44
    rows = [[(1, 0), (1, 37)], [(3, 0), (4, 41)]]
    token, groups, token_row = 0, [], []
    offset = 0
    for g, (row_width, specs) in enumerate(zip((1, width), rows)):
        n_rows = len(specs) + 1
        index = np.full((n_rows, row_width), -1, np.int32)
        positions = np.full((n_rows, row_width), -1, np.int32)
        table = np.zeros((n_rows, table_width), np.int32)
        for r, (n, first) in enumerate(specs):
            index[r, :n] = np.arange(token, token + n)
            positions[r, :n] = np.arange(first, first + n)
            table[r] = tables[2 * g + r]
            token_row.extend(offset + r * row_width + np.arange(n))
            token += n
        groups.append((index, positions, table))
        offset += n_rows * row_width
    num_tokens = token
    built = []
    for index, positions, table in groups:
        index[index < 0] = num_tokens
        longest = positions.max() + 1
        built.append(RowGroup(jnp.asarray(index), jnp.asarray(positions), jnp.asarray(table),
                              jnp.int32(-(-longest // (chunk_pages * block_size)))))
    meta = AttentionInputs(jnp.zeros(num_tokens, jnp.int32), jnp.asarray(token_row, jnp.int32), tuple(built))
    q = jnp.asarray(rng.normal(size=(num_tokens, num_kv_heads * group, head_dim)), dtype)
    return q, pools, meta


@pytest.mark.parametrize("num_kv_heads, group, dtype, tolerance", [
    (2, 1, jnp.float32, 1e-5), (2, 3, jnp.bfloat16, 2e-2), (1, 4, jnp.float32, 1e-5),
], ids=["mha-f32", "gqa3-bf16", "gqa4-f32"])
def test_the_kernel_equals_the_xla_path_in_every_layer(num_kv_heads, group, dtype, tolerance):
    q, (k_pool, v_pool), meta = ragged_step(np.random.default_rng(group), num_kv_heads, group, 16, dtype)

    @jax.jit
    def both(layer):
        return (paged_attention(q, k_pool, v_pool, layer, meta, 4, kernel="xla"),
                paged_attention(q, k_pool, v_pool, layer, meta, 4, kernel="pallas"))

    outs = []
    for layer in (0, 1):
        want, got = both(jnp.int32(layer))
        assert got.shape == want.shape == q.shape and got.dtype == q.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=tolerance, rtol=tolerance)
        outs.append(got)
    assert not np.allclose(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32))


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_a_context_split_over_programs_gives_what_one_program_gives(splits):
    """Split-K: each (row, KV head) walks 1/splits of its pages and the combine merges the partial
    softmaxes. With 3 splits of a row whose context is 3 iterations long each split has one; with 8
    most splits of every row are empty; a row at position 0 has one iteration whatever the split."""
    q, (k_pool, v_pool), meta = ragged_step(np.random.default_rng(7), 2, 2, 16, jnp.float32)
    q_padded = jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], q.dtype)])
    for group in meta.groups:
        want = _attend_rows(q_padded, k_pool, v_pool, jnp.int32(1), group, 4)
        got = pallas_attention.attend_rows(q_padded, k_pool, v_pool, jnp.int32(1), group.row_token_index,
                                           group.row_positions, group.block_tables, 4, splits=splits)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_the_context_is_split_only_when_the_rows_leave_the_gpu_idle():
    target, cap = pallas_attention.TARGET_PROGRAMS, pallas_attention.MAX_KV_SPLITS
    assert pallas_attention.kv_splits(64, 32, 16) == 1              # batch-64 decode of SmolLM2-1.7B
    assert pallas_attention.kv_splits(1, 32, 16) == target // 32    # its batch-1 decode
    assert pallas_attention.kv_splits(target // 8, 8, 16) == 1      # exactly enough programs
    assert pallas_attention.kv_splits(target // 8 - 1, 8, 16) == 1  # just short: a split would double them
    assert pallas_attention.kv_splits(1, 8, 3) == 3                 # no more splits than iterations
    assert pallas_attention.kv_splits(1, 1, 1000) == cap


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, dtype", [
    (32, 32, 64, jnp.bfloat16),    # SmolLM2-1.7B's attention
    (32, 8, 128, jnp.bfloat16),    # Llama-3-8B's
    (9, 3, 64, jnp.float32),       # SmolLM2-135M's, in float32
], ids=["smollm2-1.7b", "llama3-8b", "smollm2-135m-f32"])
@pytest.mark.parametrize("rows, width", [(64, 1), (1, 1), (20, 32)], ids=["decode", "decode-split", "chunks"])
def test_triton_lowers_the_kernel_for_cuda(num_heads, num_kv_heads, head_dim, dtype, rows, width):
    """Lowered for CUDA without a GPU: Pallas turns the kernel into Triton IR here, so a kernel
    Triton cannot express fails on CPU (the compile to PTX itself happens on a GPU). A batch-1
    decode is split along the context; the others are not."""
    num_tokens, table_width = rows * width, 128
    pool = jax.ShapeDtypeStruct((24, 1000, 16, num_kv_heads, head_dim), dtype)
    args = (jax.ShapeDtypeStruct((num_tokens + 1, num_heads, head_dim), dtype), pool, pool,
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((rows, width), jnp.int32),
            jax.ShapeDtypeStruct((rows, width), jnp.int32), jax.ShapeDtypeStruct((rows, table_width), jnp.int32))
    triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = jax.export.export(jax.jit(partial(pallas_attention.attend_rows, pages_per_block=8, interpret=False)),
                                 platforms=["cuda"], disabled_checks=[triton_call])(*args)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()
    assert exported.out_avals[0].shape == (num_tokens, num_heads, head_dim)


@pytest.mark.parametrize("attention", ["pallas", "xla"])
def test_the_gpu_step_has_no_loop_but_the_layers_and_no_branch(monkeypatch, attention):
    """A whole step of every shape lowered for CUDA: XLA:GPU waits on the host at every iteration
    of a loop whose trip count it does not know and at every conditional, so on a GPU the step's
    only XLA loop is the layer scan (its trip count is known); the kernel's loop is inside Triton.
    The XLA path, the CPU's, has a traced context loop per row group."""
    spec = tiny_spec(num_heads=4, num_kv_heads=2, head_dim=16)
    runner = LLM.from_model(Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=0)), None, num_kv_blocks=32,
                            block_size=4, attn_chunk_tokens=16, max_num_seqs=4, max_num_batched_tokens=16,
                            max_model_len=64, attention=attention, compile_cache=False, warmup=False).runner
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")   # the kernel is traced for Triton, not interpreted
    triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    for shape in runner.all_shapes():
        inputs, packing = Packing.pack(runner.prepare(SchedulerOutput(), shape)[0])
        exported = jax.export.export(runner._step, platforms=["cuda"], disabled_checks=[triton_call])(
            runner._params, runner.k_pool, runner.v_pool, inputs, runner._previous_tokens, packing)
        control = re.findall(r"stablehlo\.(while|case|if)\b", exported.mlir_module())
        groups = (shape.decode_rows > 0) + (shape.chunk_rows > 0)
        assert control == ["while"] * (1 if attention == "pallas" else 1 + groups), (shape, control)
        assert exported.mlir_module().count("xla.gpu.triton") == (groups if attention == "pallas" else 0)


def test_the_engine_generates_the_same_tokens_with_either_kernel():
    """Prefill chunks, decodes, a step mixing both, and pauses with swaps, through the whole engine."""
    spec = tiny_spec()
    tensors = random_hf_tensors(spec, seed=3)
    prompts = [list(range(5, 30)), [7, 8, 9], list(range(40, 51))]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, intercept_after=4)
    runs = {}
    for kernel in ("xla", "pallas"):
        llm = LLM.from_model(Llama.from_hf_weights(spec, tensors), None, attention=kernel, policy="swap",
                             num_kv_blocks=24, block_size=4, num_host_blocks=32, max_num_seqs=4,
                             max_num_batched_tokens=16, max_model_len=64, compile_cache=False,
                             warmup=False, strict_compile=False)   # the shapes it uses, not all of them
        assert llm.runner.attention == kernel
        runs[kernel] = paused_run(llm, prompts, params)
    assert runs["pallas"] == runs["xla"]


def mesh_of(platform: str):
    """What `for_backend` reads of a mesh: its devices' platform."""
    device = dataclasses.make_dataclass("Device", [("platform", str)])(platform)
    return dataclasses.make_dataclass("Mesh", [("devices", np.ndarray), ("size", int)])(np.array([device]), 1)


def test_attention_auto_picks_the_kernel_on_gpu_only(monkeypatch):
    monkeypatch.setattr(pallas_attention, "compile_error", lambda *shapes: None)    # as on a GPU it compiles on
    spec, f32 = tiny_spec(), jnp.float32
    cpu = for_backend(EngineConfig(), spec, mesh_of("cpu"), f32)
    assert cpu.attention == "xla" and cpu.max_num_batched_tokens == 384
    gpu = for_backend(EngineConfig(), spec, mesh_of("gpu"), f32)
    assert gpu.attention == "pallas" and gpu.max_num_batched_tokens == 2048
    assert for_backend(EngineConfig(block_size=12), spec, mesh_of("gpu"), f32).attention == "xla"
    assert for_backend(EngineConfig(attention="xla"), spec, mesh_of("gpu"), f32).attention == "xla"
    assert for_backend(EngineConfig(max_num_batched_tokens=512), spec, mesh_of("gpu"), f32).max_num_batched_tokens == 512
    assert for_backend(EngineConfig(), spec, tp_mesh(1), f32).attention == ("pallas" if jax.default_backend() == "gpu"
                                                                          else "xla")


def test_attention_auto_takes_the_xla_path_where_the_kernel_does_not_compile(monkeypatch, caplog):
    asked = []

    def fails(*shapes):
        asked.append(shapes)
        return RuntimeError("PTX for sm_90a failed")
    monkeypatch.setattr(pallas_attention, "compile_error", fails)
    spec = tiny_spec()
    with caplog.at_level("WARNING"):
        assert for_backend(EngineConfig(), spec, mesh_of("gpu"), jnp.bfloat16).attention == "xla"
    assert "does not compile on this gpu, so the XLA path is used: PTX for sm_90a failed" in caplog.text
    assert asked == [(spec.num_heads, spec.num_kv_heads, spec.head_dim, 16, 8, 32, jnp.bfloat16)]
    assert for_backend(EngineConfig(attention="pallas"), spec, mesh_of("gpu"), jnp.bfloat16).attention == "pallas"
    assert len(asked) == 1              # asked for by name: no probe, its errors are the user's to see


def test_the_compile_probe_compiles_the_kernel_for_this_machine():
    """On a GPU the kernel compiles for SmolLM2-1.7B's and Llama-3-8B's heads in bf16; elsewhere
    only the interpreter runs it, and the probe reports the compiler's refusal."""
    for heads, kv_heads, head_dim in ((32, 32, 64), (32, 8, 128)):
        error = pallas_attention.compile_error(heads, kv_heads, head_dim, 16, 8, 32, jnp.bfloat16)
        if jax.default_backend() == "gpu":
            assert error is None
        else:
            assert "Only interpret mode is supported" in str(error)


def test_a_kernel_the_shapes_do_not_fit_is_refused():
    with pytest.raises(ValueError, match="attention must be auto, xla or pallas"):
        EngineConfig(attention="flash")
    check_attention_kernel("pallas", 64, 16, 8)
    check_attention_kernel("pallas", 16, 4, 4)
    with pytest.raises(ValueError, match="block_size = 12 is not a power of two.*use attention='xla'"):
        check_attention_kernel("pallas", 64, 12, 8)
    with pytest.raises(ValueError, match="head_dim = 80 is not"):
        check_attention_kernel("pallas", 80, 16, 8)
    with pytest.raises(ValueError, match="head_dim = 8 is below 16"):
        check_attention_kernel("pallas", 8, 16, 8)
    with pytest.raises(ValueError, match="attn_chunk_tokens = 8 is below 16"):
        check_attention_kernel("pallas", 64, 4, 2)
    check_attention_kernel("xla", 80, 12, 3)


def test_the_attention_benchmark_times_kernels_that_agree(tmp_path):
    """scripts/bench_attention.py: the three kernels compute the same attention of its decode rows
    and of its prefill rows, and its rates are the bytes and FLOPs of those rows over the time it
    measured."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_attention.py"
    loader = importlib.util.spec_from_file_location("bench_attention", path)
    bench_attention = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench_attention)
    spec = bench_attention.shape_spec("tiny")
    rng = np.random.default_rng(0)
    decode = bench_attention.decode_rows(3, 40, 4, 4, 40, rng)
    tables = np.asarray(decode.groups[0].block_tables)          # 10 pages a row, 12 wide (3 reads of 4 pages)
    assert tables.shape == (3, 12) and (tables[:, 10:] == 0).all()
    assert len(set(tables[:, :10].ravel())) == 30 and 0 not in tables[:, :10]
    prefill = bench_attention.prefill_rows(2, 16, 8, 4, 4, 40, rng)   # 2 prompts of 16 tokens, rows of 8
    group = prefill.groups[0]
    assert np.asarray(group.row_positions).tolist() == [list(range(8)), list(range(8, 16))] * 2
    assert np.asarray(group.row_token_index)[3].tolist() == list(range(24, 32))
    assert (np.asarray(group.block_tables)[2] == np.asarray(group.block_tables)[3]).all()
    with pytest.raises(ValueError, match="multiple of --row-width"):
        bench_attention.prefill_rows(1, 20, 8, 4, 4, 40, rng)
    k_pool, v_pool = (jnp.asarray(rng.normal(size=(spec.num_layers, 40, 4, spec.num_kv_heads, spec.head_dim)),
                                  jnp.float32) for _ in "kv")
    for meta, tokens in ((decode, 3), (prefill, 32)):
        q = jnp.asarray(rng.normal(size=(tokens, spec.num_heads, spec.head_dim)), jnp.float32)
        sums = [float(bench_attention.step_attention(kernel, 4)(q, k_pool, v_pool, meta))
                for kernel in bench_attention.KERNELS]
        np.testing.assert_allclose(sums, sums[0], rtol=1e-5)

    common = ["--shape", "tiny", "--batches", "2", "--contexts", "32", "--kernels", "xla,pallas", "--repeats", "1"]
    rows = bench_attention.main(common + ["--out", str(tmp_path / "attention.json")])
    assert [(row["batch"], row["ctx"], row["kernel"]) for row in rows] == [(2, 32, "xla"), (2, 32, "pallas")]
    for row in rows:
        assert row["kv_bytes_per_s"] * row["ms"] / 1e3 == pytest.approx(2 * 32 * spec.kv_bytes_per_token(4))
        assert row["flops_per_s"] * row["ms"] / 1e3 == pytest.approx(
            4 * 2 * 32 * spec.num_heads * spec.head_dim * spec.num_layers)
    assert (tmp_path / "attention.json").exists()
    rows = bench_attention.main(common + ["--rows", "prefill", "--row-width", "16"])
    for row in rows:
        assert row["flops_per_s"] * row["ms"] / 1e3 == pytest.approx(
            4 * 2 * (32 * 33 // 2) * spec.num_heads * spec.head_dim * spec.num_layers)
