"""ModelRunner: turns a SchedulerOutput into one jitted step on the paged KV pools.

Host preparation is numpy, padded to a small set of bucket shapes `(tokens, rows, row width)`.
Every shape is compiled ahead of time at warm-up and the KV pools are donated, so a step neither
copies the pools nor compiles. With `strict_compile`, a shape that was not compiled at warm-up
raises instead of compiling silently.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infercept_jax.sampling import sample
from kvcache.block_manager import BlockManager
from kvcache.paged import AttentionInputs, allocate_pools
from models.llama import Llama
from scheduling.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

FEW_SEQUENCES = 4  # extra rows of the small row bucket of a chunked step


class StepBatch(NamedTuple):
    token_ids: jax.Array     # [T]
    positions: jax.Array     # [T]
    attn: AttentionInputs
    sample_index: jax.Array  # [B] flat index of the token whose logits are sampled
    temperature: jax.Array   # [B]
    top_k: jax.Array         # [B]
    top_p: jax.Array         # [B]
    seeds: jax.Array         # [B]
    steps: jax.Array         # [B] tokens the request generated so far (folds into its key)


@dataclass(frozen=True, slots=True)
class StepShape:
    num_tokens: int   # T: flat query tokens (the matmuls run on these)
    num_rows: int     # R: attention rows
    row_width: int    # Q: query tokens per row (1 when every request decodes one token)
    num_samples: int  # B: sequences that can sample in the step


def token_buckets(max_tokens: int, smallest: int) -> list[int]:
    """Powers of two from `smallest` up to `max_tokens`, then `max_tokens` itself."""
    out, b = [], smallest
    while b < max_tokens:
        out.append(b)
        b *= 2
    return out + [max_tokens]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ModelRunner:
    def __init__(self, model: Llama, block_manager: BlockManager, *, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, row_width: int = 32,
                 attn_chunk_tokens: int = 128, strict_compile: bool = True):
        self.spec = model.spec
        self.blocks = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.row_width = row_width
        self.pages_per_chunk = max(1, attn_chunk_tokens // self.block_size)
        self.chunk_tokens = self.pages_per_chunk * self.block_size
        width = _ceil_div(max_model_len, self.block_size)
        self.table_width = _ceil_div(width, self.pages_per_chunk) * self.pages_per_chunk
        self.strict_compile = strict_compile
        self.decode_buckets = token_buckets(min(max_num_seqs, max_num_batched_tokens), smallest=1)
        self.chunk_buckets = token_buckets(max_num_batched_tokens, smallest=16)

        graphdef, state = nnx.split(model)
        self._params, treedef = jax.tree.flatten(state)
        self.k_pool, self.v_pool = allocate_pools(
            self.spec.num_layers, block_manager.device.num_blocks, self.block_size,
            self.spec.num_kv_heads, self.spec.head_dim, model.dtype)
        pages_per_chunk = self.pages_per_chunk

        def step(params, k_pool, v_pool, batch: StepBatch):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
            hidden, k_pool, v_pool = model(batch.token_ids, batch.positions, k_pool, v_pool,
                                           batch.attn, pages_per_chunk)
            logits = model.logits(hidden[batch.sample_index])
            tokens = sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.seeds, batch.steps)
            return tokens, k_pool, v_pool

        self._step = jax.jit(step, donate_argnums=(1, 2))
        self._compiled: dict[StepShape, jax.stages.Compiled] = {}

    # ----------------------------------------------------------------- shapes
    def all_shapes(self) -> list[StepShape]:
        """Every shape a step can take: decode-only shapes, then two row counts per token bucket."""
        shapes = [StepShape(t, t, 1, t) for t in self.decode_buckets]
        for t in self.chunk_buckets:
            for rows in self._row_buckets(t):
                shapes.append(StepShape(t, rows, self.row_width, min(rows, self.max_num_seqs)))
        return shapes

    def _row_buckets(self, num_tokens: int) -> list[int]:
        """A step of `num_tokens` needs at most `ceil(T/Q) + sequences` rows. Two variants: room
        for a few sequences (prefill of new prompts), and room for a full batch (decodes + chunks)."""
        full = min(num_tokens, self.max_num_seqs + _ceil_div(num_tokens, self.row_width))
        few = min(full, _ceil_div(num_tokens, self.row_width) + FEW_SEQUENCES)
        return sorted({few, full})

    def shape_for(self, output: SchedulerOutput) -> StepShape:
        counts = [s.num_query_tokens for s in output.scheduled]
        total = sum(counts)
        if max(counts) == 1:
            t = next(b for b in self.decode_buckets if b >= total)
            return StepShape(t, t, 1, t)
        t = next(b for b in self.chunk_buckets if b >= total)
        rows_needed = sum(_ceil_div(n, self.row_width) for n in counts)
        rows = next(r for r in self._row_buckets(t) if r >= rows_needed)
        return StepShape(t, rows, self.row_width, min(rows, self.max_num_seqs))

    # ----------------------------------------------------------------- prep
    def prepare(self, output: SchedulerOutput, shape: StepShape) -> tuple[StepBatch, list]:
        """numpy inputs for `shape`; also returns the requests that sample a token, in order."""
        T, R, Q, B = shape.num_tokens, shape.num_rows, shape.row_width, shape.num_samples
        bs = self.block_size
        token_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slot_mapping = np.zeros(T, np.int32)
        row_token_index = np.full((R, Q), T, np.int32)
        row_positions = np.full((R, Q), -1, np.int32)
        token_row_index = np.zeros(T, np.int32)
        block_tables = np.zeros((R, self.table_width), np.int32)
        sample_index = np.zeros(B, np.int32)
        temperature = np.zeros(B, np.float32)
        top_k = np.zeros(B, np.int32)
        top_p = np.ones(B, np.float32)
        seeds = np.zeros(B, np.uint32)
        steps = np.zeros(B, np.int32)
        sampled = []
        t = r = 0
        for item in output.scheduled:
            req, n = item.request, item.num_query_tokens
            start = req.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            table = np.asarray(self.blocks.tables[req.request_id], np.int32)
            token_ids[t:t + n] = req.token_ids[start:start + n]
            positions[t:t + n] = pos
            slot_mapping[t:t + n] = table[pos // bs] * bs + pos % bs
            for row_start in range(0, n, Q):
                m = min(Q, n - row_start)
                row_token_index[r, :m] = np.arange(t + row_start, t + row_start + m)
                row_positions[r, :m] = pos[row_start:row_start + m]
                token_row_index[t + row_start:t + row_start + m] = r * Q + np.arange(m)
                block_tables[r, :len(table)] = table
                r += 1
            if start + n == req.num_tokens:
                i = len(sampled)
                sp = req.sampling
                sample_index[i] = t + n - 1
                temperature[i], top_k[i], top_p[i] = sp.temperature, sp.top_k, sp.top_p
                seeds[i], steps[i] = req.seed, len(req.output_token_ids)
                sampled.append(req)
            t += n
        longest = int(row_positions.max()) + 1
        attn = AttentionInputs(slot_mapping, row_token_index, row_positions, token_row_index,
                               block_tables, np.int32(_ceil_div(longest, self.chunk_tokens)))
        batch = StepBatch(token_ids, positions, attn, sample_index, temperature, top_k, top_p, seeds, steps)
        return batch, sampled

    def _dummy_batch(self, shape: StepShape) -> StepBatch:
        T, R, Q, B = shape.num_tokens, shape.num_rows, shape.row_width, shape.num_samples
        z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
        attn = AttentionInputs(z(T), z(R, Q), z(R, Q), z(T), z(R, self.table_width), np.int32(0))
        return StepBatch(z(T), z(T), attn, z(B), np.zeros(B, np.float32), z(B),
                         np.ones(B, np.float32), np.zeros(B, np.uint32), z(B))

    # ----------------------------------------------------------------- run
    def compile(self, shape: StepShape) -> jax.stages.Compiled:
        if shape not in self._compiled:
            self._compiled[shape] = self._lower(shape).compile()
        return self._compiled[shape]

    def _lower(self, shape: StepShape) -> jax.stages.Lowered:
        return self._step.lower(self._params, self.k_pool, self.v_pool, self._dummy_batch(shape))

    def warmup(self) -> tuple[int, float]:
        """Compile every step shape; returns (number of shapes, seconds)."""
        start = time.perf_counter()
        shapes = self.all_shapes()
        lowered = [(shape, self._lower(shape)) for shape in shapes]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            compiled = list(pool.map(lambda item: item[1].compile(), lowered))
        self._compiled.update((shape, c) for (shape, _), c in zip(lowered, compiled))
        seconds = time.perf_counter() - start
        log.info("warm-up compiled %d step shapes in %.1f s", len(shapes), seconds)
        return len(shapes), seconds

    def execute(self, output: SchedulerOutput) -> list[tuple[object, int]]:
        """Run one step; returns (request, sampled token) for each request that samples."""
        shape = self.shape_for(output)
        fn = self._compiled.get(shape)
        if fn is None:
            if self.strict_compile:
                raise RuntimeError(f"step shape {shape} was not compiled at warm-up")
            fn = self.compile(shape)
        batch, sampled = self.prepare(output, shape)
        tokens, self.k_pool, self.v_pool = fn(self._params, self.k_pool, self.v_pool, batch)
        if not sampled:
            return []
        tokens = np.asarray(tokens)
        return list(zip(sampled, tokens[:len(sampled)].tolist()))
