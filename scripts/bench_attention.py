"""Benchmark the paged attention read alone against the machine's roofline measured in the same run.

On a model shape's KV (random pools of every layer, each sequence's pages scattered over them),
one jitted call walks the layers as a step does and runs `paged_attention` in each, with:
  * `xla`: the portable path (a traced loop over `attn_chunk_tokens` chunks per layer);
  * `pallas`: the Pallas kernel, its context split over programs where the grid is small (split-K);
  * `pallas-1`: the Pallas kernel with one program per (row, KV head), for the split's effect.
Rows (`--rows`): `decode`, B sequences of ctx tokens decoding one token each, where the KV read is
the bound (KV bytes per second, as a share of the read bandwidth); or `prefill`, B prompts of ctx
tokens attending causally in rows of `--row-width` tokens, where the arithmetic is (attention
FLOP/s, as a share of the matmul rate). It reports the median ms per step's attention. Bandwidth and
matmul rate come from `profiler.measure_machine`, the issue-13 roofline's. On a CPU the kernel runs
in Pallas's interpreter: its times there say nothing about a GPU.

    .venv/bin/python scripts/bench_attention.py --shape tiny --batches 1,4 --contexts 64 --kernels xla,pallas
    python scripts/bench_attention.py --shape smollm2-1.7b       # on a GPU: B 1,8,64 x ctx 512,4096
    python scripts/bench_attention.py --shape smollm2-1.7b --rows prefill --batches 8 --contexts 512
"""
from __future__ import annotations

import argparse
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from infercept_jax.experiments.records import machine_record, write_result
from infercept_jax.llm import resolve_dtype
from infercept_jax.profiler import measure_machine, median_seconds
from kvcache.paged import AttentionInputs, RowGroup, paged_attention
from models.shapes import shape_spec

KERNELS = ("xla", "pallas", "pallas-1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-1.7b", help="a model shape of models/shapes.py")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on GPU/TPU (as the engine's dtype=auto)")
    p.add_argument("--batches", default="1,8,64", help="comma-separated numbers of decode rows")
    p.add_argument("--contexts", default="512,4096", help="comma-separated context lengths")
    p.add_argument("--max-kv-tokens", type=int, default=65536,
                   help="skip (B, ctx) where B*ctx is above this (the pools' size)")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    p.add_argument("--rows", default="decode", choices=["decode", "prefill"],
                   help="decode: one query token per sequence; prefill: whole prompts in rows of --row-width")
    p.add_argument("--row-width", type=int, default=32, help="prefill: query tokens per row (the engine's row_width)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--attn-chunk-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.kernels = args.kernels.split(",")
    unknown = sorted(set(args.kernels) - set(KERNELS))
    if unknown:
        p.error(f"unknown kernel(s) {unknown}; known: {', '.join(KERNELS)}")
    return args


def scattered_tables(batch: int, ctx: int, block_size: int, pages_per_chunk: int, num_blocks: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Block tables of B sequences of ctx tokens, each on its own random pages (block 0 stays
    reserved), as wide as whole reads of `pages_per_chunk` pages."""
    pages = math.ceil(ctx / block_size)
    tables = np.zeros((batch, math.ceil(pages / pages_per_chunk) * pages_per_chunk), np.int32)
    tables[:, :pages] = (1 + rng.permutation(num_blocks - 1)[:batch * pages]).reshape(batch, pages)
    return tables


def decode_rows(batch: int, ctx: int, block_size: int, pages_per_chunk: int, num_blocks: int,
                rng: np.random.Generator) -> AttentionInputs:
    """B decode rows at position ctx - 1."""
    tables = scattered_tables(batch, ctx, block_size, pages_per_chunk, num_blocks, rng)
    group = RowGroup(np.arange(batch, dtype=np.int32)[:, None], np.full((batch, 1), ctx - 1, np.int32), tables,
                     np.int32(math.ceil(ctx / (pages_per_chunk * block_size))))
    return AttentionInputs(np.zeros(batch, np.int32), np.arange(batch, dtype=np.int32), (group,))


def prefill_rows(batch: int, ctx: int, width: int, block_size: int, pages_per_chunk: int, num_blocks: int,
                 rng: np.random.Generator) -> AttentionInputs:
    """B whole prompts of ctx tokens (ctx a multiple of `width`), in rows of `width` tokens: token
    b * ctx + p sits at position p, in row (b * ctx + p) // width."""
    if ctx % width:
        raise ValueError(f"prefill rows need ctx ({ctx}) to be a multiple of --row-width ({width})")
    tables = scattered_tables(batch, ctx, block_size, pages_per_chunk, num_blocks, rng)
    tokens = np.arange(batch * ctx, dtype=np.int32)
    group = RowGroup(tokens.reshape(-1, width), (tokens % ctx).reshape(-1, width), np.repeat(tables, ctx // width, 0),
                     np.int32(math.ceil(ctx / (pages_per_chunk * block_size))))
    return AttentionInputs(np.zeros(batch * ctx, np.int32), tokens, (group,))


def step_attention(kernel: str, pages_per_chunk: int):
    """A jitted walk over the layers, as a step's: the attention of every layer, summed so none is dropped."""
    attend = partial(paged_attention, pages_per_chunk=pages_per_chunk, kernel=kernel.split("-")[0],
                     kv_splits=1 if kernel == "pallas-1" else None)   # None: the kernel's own choice

    @jax.jit
    def run(q, k_pool, v_pool, meta):
        def layer(i, total):
            return total + attend(q, k_pool, v_pool, i, meta).astype(jnp.float32).sum()
        return jax.lax.fori_loop(0, k_pool.shape[0], layer, jnp.float32(0))
    return run


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    started = time.perf_counter()
    record = machine_record()
    spec = shape_spec(args.shape)
    dtype = resolve_dtype(args.dtype)
    machine = measure_machine(dtype)
    bandwidth = machine["read_bytes_per_s"]
    pages_per_chunk = args.attn_chunk_tokens // args.block_size
    rng = np.random.default_rng(0)
    configs = [(b, c) for c in map(int, args.contexts.split(",")) for b in map(int, args.batches.split(","))
               if b * c <= args.max_kv_tokens]
    num_blocks = 1 + max(b * math.ceil(c / args.block_size) for b, c in configs)
    pool_shape = (spec.num_layers, num_blocks, args.block_size, spec.num_kv_heads, spec.head_dim)
    k_pool, v_pool = (jax.random.normal(jax.random.key(seed), pool_shape, dtype) for seed in (1, 2))
    runs = {kernel: step_attention(kernel, pages_per_chunk) for kernel in args.kernels}
    rows = []
    print(f"{args.shape} on {jax.default_backend()}, {jnp.dtype(dtype).name}; read bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s, matmul {machine['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s; "
          f"{spec.num_layers} layers, {spec.num_heads} heads, {spec.num_kv_heads} KV heads; {args.rows} rows\n")
    print("| B | ctx | kernel | ms per step | KV GB/s | of the read bandwidth | attention TFLOP/s | of the matmul rate |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for batch, ctx in configs:
        if args.rows == "decode":
            meta = decode_rows(batch, ctx, args.block_size, pages_per_chunk, num_blocks, rng)
            queries, attended = batch, batch * ctx                      # keys seen, summed over query tokens
        else:
            meta = prefill_rows(batch, ctx, args.row_width, args.block_size, pages_per_chunk, num_blocks, rng)
            queries, attended = batch * ctx, batch * ctx * (ctx + 1) // 2
        q = jnp.asarray(rng.normal(size=(queries, spec.num_heads, spec.head_dim)), dtype)
        kv_bytes = batch * ctx * spec.kv_bytes_per_token(jnp.dtype(dtype).itemsize)
        flops = 4 * attended * spec.num_heads * spec.head_dim * spec.num_layers
        for kernel, run in runs.items():
            seconds = median_seconds(lambda: run(q, k_pool, v_pool, meta).block_until_ready(), args.repeats)
            row = {"rows": args.rows, "batch": batch, "ctx": ctx, "kernel": kernel, "ms": seconds * 1e3,
                   "kv_bytes_per_s": kv_bytes / seconds, "of_bandwidth": kv_bytes / seconds / bandwidth,
                   "flops_per_s": flops / seconds, "of_matmul": flops / seconds / machine["matmul_flops_per_s"]}
            rows.append(row)
            print(f"| {batch} | {ctx} | {kernel} | {row['ms']:.3f} | {row['kv_bytes_per_s'] / 1e9:.1f} | "
                  f"{row['of_bandwidth']:.0%} | {row['flops_per_s'] / 1e12:.2f} | {row['of_matmul']:.0%} |")
    if args.out:
        write_result(args.out, {"args": vars(args), "machine": {**record, **machine}, "rows": rows},
                     started)
    return rows


if __name__ == "__main__":
    main()
