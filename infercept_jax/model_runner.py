"""ModelRunner: turns a SchedulerOutput into one jitted step on the paged KV pools.

Host preparation is numpy, padded to a small set of bucket shapes (`StepShape`).
Every shape is compiled ahead of time at warm-up and the KV pools are donated, so a step neither
copies the pools nor compiles. With `strict_compile`, a shape that was not compiled at warm-up
raises instead of compiling silently. The step's swap copies (`kvcache.swap`) are issued before the
step is dispatched, in the order that makes reusing a block in the same step safe: swap-out
gathers, then swap-in scatters, then the step's own KV writes. A step's inputs, some twenty small
arrays, travel to the device as one buffer (`Packing`). In a multi-host run process 0
sends each step's inputs (copies, shape, padded batch) to the other processes before it makes the
step, and they make the same device calls (`follow`).
"""
from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infercept_jax.parallel import StepChannel, check_tensor_parallel, kv_pool_sharding, tensor_parallel_size, tp_mesh
from infercept_jax.sampling import FILTERED, GREEDY, SamplingBatch, greedy, sample, sampling_mode
from kvcache.block_manager import BlockManager
from kvcache.paged import ATTENTION_KERNELS, AttentionInputs, RowGroup, allocate_pools
from kvcache.swap import make_host_pool
from models.llama import TP, Llama, matmul_precision
from scheduling.request import PLACEHOLDER_TOKEN
from scheduling.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

FEW_SEQUENCES = 4  # chunk rows beyond ceil(T / row_width) in the smaller chunk shapes


class StepBatch(NamedTuple):
    token_ids: jax.Array     # [T]
    positions: jax.Array     # [T]
    attn: AttentionInputs
    sample_index: jax.Array  # [B] flat index of the token whose logits are sampled
    sampling: SamplingBatch  # [B] each
    previous: jax.Array      # [T] a placeholder token's index among the previous step's samples, else -1


class Launched(NamedTuple):
    """A step on its way: its sampled tokens (on device), whom they are for, its swap stall."""
    tokens: jax.Array | None
    sampled: list
    stall: float


@dataclass(frozen=True, slots=True)
class StepShape:
    num_tokens: int    # T: flat query tokens (the matmuls run on these)
    decode_rows: int   # rows of width 1, one per request that computes a single token
    chunk_rows: int    # rows of width `row_width` for requests with several tokens
    row_width: int
    num_samples: int   # B: requests that can sample in the step


@dataclass(frozen=True)
class Packing:
    """How a pytree of 4-byte numpy arrays (a `StepBatch`, a `SamplingBatch`) travels to the device
    as one int32 buffer: a jitted call copies each array argument to the device on its own, and a
    step has some twenty small ones. Static (hashable): the compiled call unpacks with it."""

    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], np.dtype], ...]   # each array's shape and dtype, in order

    @classmethod
    def pack(cls, tree) -> tuple[np.ndarray, Packing]:
        """The buffer and how to unpack it (what a tree of this layout compiles with)."""
        leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
        return cls.buffer(tree), cls(jax.tree.structure(tree), tuple((a.shape, a.dtype) for a in leaves))

    @staticmethod
    def buffer(tree) -> np.ndarray:
        """The tree's arrays as one int32 buffer: all a compiled call needs at each step."""
        arrays = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
        wide = [a.dtype for a in arrays if a.dtype.itemsize != 4]
        if wide:
            raise TypeError(f"only 4-byte arrays can be packed, not {wide}")
        return np.concatenate([a.reshape(-1).view(np.int32) for a in arrays])

    def unpack(self, buffer: jax.Array):
        """The tree again, on the device: static slices of `buffer`, bit-cast back to their dtypes."""
        leaves, offset = [], 0
        for shape, dtype in self.leaves:
            size = math.prod(shape)
            piece = buffer[offset:offset + size].reshape(shape)
            leaves.append(piece if dtype == np.int32 else jax.lax.bitcast_convert_type(piece, dtype))
            offset += size
        return jax.tree.unflatten(self.treedef, leaves)


def _row_group(num_rows: int, width: int, num_tokens: int, first_token: np.ndarray, first_position: np.ndarray,
               length: np.ndarray, tables: np.ndarray, chunk_tokens: int) -> RowGroup:
    """A group of `num_rows` rows of `width`; row r holds `length[r]` tokens from flat index
    `first_token[r]` and position `first_position[r]` on, with block table `tables[r]`. Rows past
    the given ones, and entries past a row's length, are padding (token T, position -1, block 0)."""
    offsets = np.arange(width, dtype=np.int32)
    used = len(length)
    valid = offsets[None, :] < length[:, None]
    token_index = np.full((num_rows, width), num_tokens, np.int32)
    positions = np.full((num_rows, width), -1, np.int32)
    row_tables = np.zeros((num_rows, tables.shape[1]), np.int32)
    token_index[:used] = np.where(valid, first_token[:, None] + offsets, num_tokens)
    positions[:used] = np.where(valid, first_position[:, None] + offsets, -1)
    row_tables[:used] = tables
    longest = int(positions.max()) + 1
    return RowGroup(token_index, positions, row_tables, np.int32(_ceil_div(longest, chunk_tokens)))


def pallas_misfits(head_dim: int, block_size: int, pages_per_chunk: int) -> list[str]:
    """Why the Pallas kernel does not fit these shapes (empty if it does): Triton's tiles have
    power-of-two sides and its dot at least 16 on each (the kernel reads `pages_per_chunk` pages of
    `block_size` keys per iteration)."""
    sides = {"head_dim": head_dim, "block_size": block_size, "attn_chunk_tokens // block_size": pages_per_chunk}
    misfits = [f"{name} = {value} is not a power of two" for name, value in sides.items() if value & (value - 1)]
    if head_dim < 16:
        misfits.append(f"head_dim = {head_dim} is below 16")
    if block_size * pages_per_chunk < 16:
        misfits.append(f"attn_chunk_tokens = {block_size * pages_per_chunk} is below 16")
    return misfits


def check_attention_kernel(kernel: str, head_dim: int, block_size: int, pages_per_chunk: int) -> None:
    """Refuse an unknown kernel, or the Pallas kernel for shapes it does not fit."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
    misfits = pallas_misfits(head_dim, block_size, pages_per_chunk) if kernel == "pallas" else []
    if misfits:
        raise ValueError(f"the pallas attention kernel does not fit: {'; '.join(misfits)}; use attention='xla'")


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
                 attn_chunk_tokens: int = 128, strict_compile: bool = True, mesh: Mesh | None = None,
                 attention: str = "xla", swap_transfer: str = "auto"):
        """`mesh` (None: one device) splits the weights and the KV pools for tensor parallelism;
        a model built elsewhere is moved to its splits. `attention` is the paged attention's kernel
        (`kvcache.paged.ATTENTION_KERNELS`); `swap_transfer` the host pool's memory
        (`kvcache.swap.make_host_pool`)."""
        self.spec = model.spec
        self.dtype = model.dtype
        self.mesh = mesh or tp_mesh(1)
        check_tensor_parallel(self.spec, tensor_parallel_size(self.mesh))
        self.blocks = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.row_width = row_width
        self.pages_per_chunk = max(1, attn_chunk_tokens // self.block_size)
        self.chunk_tokens = self.pages_per_chunk * self.block_size
        self.attention = attention
        check_attention_kernel(attention, self.spec.head_dim, self.block_size, self.pages_per_chunk)
        width = _ceil_div(max_model_len, self.block_size)
        self.table_width = _ceil_div(width, self.pages_per_chunk) * self.pages_per_chunk
        self.strict_compile = strict_compile
        # Never a 1-token step: XLA:CPU turns a one-index scatter into a dynamic-update-slice and then
        # copies the whole KV pool in every layer (seconds per step); a padding token avoids it.
        self.decode_buckets = token_buckets(max(2, min(max_num_seqs, max_num_batched_tokens)), smallest=2)
        self.chunk_buckets = token_buckets(max_num_batched_tokens, smallest=16)

        model.shard(self.mesh)
        graphdef, state = nnx.split(model)
        self._params, treedef = jax.tree.flatten(state)
        pool_sharding = kv_pool_sharding(self.mesh)
        self.k_pool, self.v_pool = allocate_pools(
            self.spec.num_layers, block_manager.device.num_blocks, self.block_size,
            self.spec.num_kv_heads, self.spec.head_dim, model.dtype, sharding=pool_sharding)
        self.host_pool = None
        if block_manager.host.num_blocks:
            self.host_pool = make_host_pool(self.spec.num_layers, block_manager.host.num_blocks, self.block_size,
                                            self.spec.num_kv_heads, self.spec.head_dim, model.dtype,
                                            sharding=pool_sharding, transfer=swap_transfer)
        pages_per_chunk, mesh = self.pages_per_chunk, self.mesh

        # Every step returns its samples padded to the same length, so that the next step can read
        # the tokens it was launched before (async scheduling) from an input of one shape.
        self.max_samples = max(shape.num_samples for shape in self.all_shapes())
        max_samples = self.max_samples

        def padded(tokens):
            return jnp.zeros(max_samples, tokens.dtype).at[:tokens.shape[0]].set(tokens)

        def step(params, k_pool, v_pool, inputs, previous_tokens, packing: Packing):
            """The forward pass and the greedy tokens; also the logits, for a batch that draws.
            `inputs` is the `StepBatch` packed by `packing`."""
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
            batch: StepBatch = packing.unpack(inputs)
            token_ids = jnp.where(batch.previous >= 0, previous_tokens[jnp.maximum(batch.previous, 0)], batch.token_ids)
            hidden, k_pool, v_pool = model(token_ids, batch.positions, k_pool, v_pool,
                                           batch.attn, pages_per_chunk, attention, mesh)
            logits = model.logits(hidden[batch.sample_index])
            return padded(greedy(logits)), logits, k_pool, v_pool

        def draw(logits, inputs, packing: Packing, filtered: bool):
            return padded(sample(logits, packing.unpack(inputs), filtered))

        # Explicit shardings (see infercept_jax/parallel.py): the weights keep their splits, the
        # pools stay split by KV heads, the logits by vocabulary as the head makes them (a greedy
        # step gathers none of them), the step's inputs and sampled tokens are replicated.
        replicated = NamedSharding(self.mesh, P())
        vocab_split = NamedSharding(self.mesh, P(None, TP))
        param_shardings = [p.sharding for p in self._params]
        self._step = jax.jit(step, donate_argnums=(1, 2), static_argnums=5,
                             in_shardings=(param_shardings, pool_sharding, pool_sharding, replicated, replicated),
                             out_shardings=(replicated, vocab_split, pool_sharding, pool_sharding))
        self._draw = jax.jit(draw, static_argnums=(2, 3), in_shardings=(vocab_split, replicated), out_shardings=replicated)
        self._compiled: dict[StepShape, jax.stages.Compiled] = {}
        self._compiled_draws: dict[tuple[int, bool], jax.stages.Compiled] = {}   # by (B, filtered)
        self._last_step: tuple[StepShape, StepBatch] | None = None   # for device_seconds_of_last_step
        # The last step's sampled tokens, and the slot of each request among them (the placeholders
        # of the next step's inputs are read from there).
        self._previous_tokens = jax.device_put(np.zeros(self.max_samples, np.int32), replicated)
        self._previous_slots: dict[str, int] = {}
        # A run of several processes: process 0 schedules, the others follow its steps.
        self.channel = StepChannel() if jax.process_count() > 1 else None

    @property
    def weight_bytes(self) -> int:
        """The model's weights in bytes, all devices' parts together."""
        return sum(param.nbytes for param in self._params)

    # ----------------------------------------------------------------- shapes
    def all_shapes(self) -> list[StepShape]:
        """Every shape a step can take: decode-only shapes, then three per token bucket."""
        shapes = [StepShape(t, t, 0, 1, t) for t in self.decode_buckets]
        for t in self.chunk_buckets:
            shapes.extend(self._chunk_shapes(t))
        return list(dict.fromkeys(shapes))

    def _chunk_shapes(self, num_tokens: int) -> list[StepShape]:
        """Shapes of a step with prefill chunks, cheapest first: a few sequences in chunk rows
        (new prompts); a decode group beside a few chunk rows (decodes plus a prompt); and a
        fallback with a chunk row for every possible sequence."""
        q, seqs = self.row_width, self.max_num_seqs
        few = _ceil_div(num_tokens, q) + FEW_SEQUENCES
        full = min(num_tokens, seqs + _ceil_div(num_tokens, q))
        decodes = min(seqs, num_tokens)
        return [StepShape(num_tokens, 0, min(few, full), q, min(few, full, seqs)),
                StepShape(num_tokens, decodes, few, q, min(decodes + few, seqs)),
                StepShape(num_tokens, 0, full, q, min(full, seqs))]

    def shape_for(self, output: SchedulerOutput) -> StepShape:
        counts = [s.num_query_tokens for s in output.scheduled]
        total = sum(counts)
        if max(counts) == 1:
            t = next(b for b in self.decode_buckets if b >= total)
            return StepShape(t, t, 0, 1, t)
        t = next(b for b in self.chunk_buckets if b >= total)
        singles = counts.count(1)
        multi_rows = sum(_ceil_div(n, self.row_width) for n in counts if n > 1)
        for shape in self._chunk_shapes(t):
            if shape.decode_rows:
                fits = singles <= shape.decode_rows and multi_rows <= shape.chunk_rows
            else:
                fits = singles + multi_rows <= shape.chunk_rows
            if fits:
                return shape
        raise AssertionError(f"no step shape holds {counts}")  # the last shape holds any schedule

    # ----------------------------------------------------------------- prep
    def prepare(self, output: SchedulerOutput, shape: StepShape) -> tuple[StepBatch, list]:
        """numpy inputs for `shape`; also returns the requests that sample a token, in order.

        A few whole-batch numpy operations over per-request lists, not a loop of small ones per
        request: this runs on the host between two device steps."""
        T, B, bs, width = shape.num_tokens, shape.num_samples, self.block_size, shape.row_width
        items = output.scheduled
        counts = np.array([item.num_query_tokens for item in items], np.int32)
        starts = np.array([item.request.num_computed_tokens for item in items], np.int32)
        first_tokens = np.cumsum(counts, dtype=np.int32) - counts
        tables = np.zeros((len(items), self.table_width), np.int32)
        ids: list[int] = []
        for i, item in enumerate(items):
            req, start = item.request, item.request.num_computed_tokens
            ids.extend(req.token_ids[start:start + item.num_query_tokens])
            table = self.blocks.tables[req.request_id]
            tables[i, :len(table)] = table
        total = len(ids)
        token_item = np.repeat(np.arange(len(items)), counts)
        token_positions = starts[token_item] + np.arange(total, dtype=np.int32) - first_tokens[token_item]
        token_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slot_mapping = np.zeros(T, np.int32)
        token_ids[:total] = ids
        previous = np.full(T, -1, np.int32)
        waiting_for = np.flatnonzero(token_ids[:total] == PLACEHOLDER_TOKEN)
        if len(waiting_for):   # tokens the step launched before this one is sampling
            slots = np.array([self._previous_slots[items[i].request.request_id] for i in token_item[waiting_for]])
            previous[waiting_for] = slots
            token_ids[waiting_for] = 0
        positions[:total] = token_positions
        slot_mapping[:total] = tables[token_item, token_positions // bs] * bs + token_positions % bs

        # Rows: a request with one token gets a decode row where the shape has a decode group;
        # every other request is cut into chunk rows of `width`.
        in_decode = (counts == 1) if shape.decode_rows else np.zeros(len(items), bool)
        decode_items = np.flatnonzero(in_decode)
        chunk_items = np.flatnonzero(~in_decode)
        rows_per_item = -(-counts[chunk_items] // width)
        row_item = np.repeat(chunk_items, rows_per_item)
        row_skip = (np.arange(len(row_item)) - np.repeat(np.cumsum(rows_per_item) - rows_per_item, rows_per_item)) * width
        row_length = np.minimum(counts[row_item] - row_skip, width)
        groups = []
        token_row_index = np.zeros(T, np.int32)
        if shape.decode_rows:
            decode = _row_group(shape.decode_rows, 1, T, first_tokens[decode_items], starts[decode_items],
                                counts[decode_items], tables[decode_items], self.chunk_tokens)
            token_row_index[first_tokens[decode_items]] = np.arange(len(decode_items))
            groups.append(decode)
        if shape.chunk_rows:
            chunk = _row_group(shape.chunk_rows, width, T, first_tokens[row_item] + row_skip,
                               starts[row_item] + row_skip, row_length, tables[row_item], self.chunk_tokens)
            real = chunk.row_token_index < T        # entry r * width + j of the group holds a token
            token_row_index[chunk.row_token_index[real]] = shape.decode_rows + np.flatnonzero(real.reshape(-1))
            groups.append(chunk)

        samplers = [i for i, item in enumerate(items) if item.samples]
        sampled = [items[i].request for i in samplers]
        sample_index = np.zeros(B, np.int32)
        sampling = _greedy_sampling(B)
        n = len(sampled)
        sample_index[:n] = first_tokens[samplers] + counts[samplers] - 1
        sampling.temperature[:n] = [req.sampling.temperature for req in sampled]
        sampling.top_k[:n] = [req.sampling.top_k for req in sampled]
        sampling.top_p[:n] = [req.sampling.top_p for req in sampled]
        sampling.seeds[:n] = [req.seed for req in sampled]
        sampling.steps[:n] = [req.num_tokens - req.num_prompt_tokens for req in sampled]   # no copy of the output
        attn = AttentionInputs(slot_mapping, token_row_index, tuple(groups))
        return StepBatch(token_ids, positions, attn, sample_index, sampling, previous), sampled

    # ----------------------------------------------------------------- run
    def compile(self, shape: StepShape) -> jax.stages.Compiled:
        if shape not in self._compiled:
            self._compiled[shape] = self._lower(shape).compile()
        return self._compiled[shape]

    def compile_draw(self, num_samples: int, filtered: bool) -> jax.stages.Compiled:
        """The draw of a batch of `num_samples` rows that samples (`sampling_mode`)."""
        key = num_samples, filtered
        if key not in self._compiled_draws:
            self._compiled_draws[key] = self._lower_draw(*key).compile()
        return self._compiled_draws[key]

    def _lower(self, shape: StepShape) -> jax.stages.Lowered:
        empty = self.prepare(SchedulerOutput(), shape)[0]  # all padding: the same layout a real step gets
        inputs, packing = Packing.pack(empty)
        with matmul_precision(self.dtype):
            return self._step.lower(self._params, self.k_pool, self.v_pool, inputs, self._previous_tokens, packing)

    def _lower_draw(self, num_samples: int, filtered: bool) -> jax.stages.Lowered:
        logits = jax.ShapeDtypeStruct((num_samples, self.spec.vocab_size), jnp.float32)
        return self._draw.lower(logits, *Packing.pack(_greedy_sampling(num_samples)), filtered)

    def _draw_needed(self, shape: StepShape, batch: StepBatch) -> tuple[int, bool] | None:
        """The key of the draw a step needs after its greedy tokens (`compile_draw`), or None."""
        mode = sampling_mode(batch.sampling)
        return None if mode == GREEDY else (shape.num_samples, mode == FILTERED)

    def warmup(self) -> tuple[int, float]:
        """Compile every step shape, and the draws of each batch size; returns (number of step
        shapes, seconds)."""
        start = time.perf_counter()
        shapes = self.all_shapes()
        draws = [(b, filtered) for b in sorted({shape.num_samples for shape in shapes}) for filtered in (False, True)]
        lowered = [(shape, self._lower(shape)) for shape in shapes]
        lowered_draws = [(key, self._lower_draw(*key)) for key in draws]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            compiled = list(pool.map(lambda item: item[1].compile(), lowered + lowered_draws))
        self._compiled.update((shape, c) for (shape, _), c in zip(lowered, compiled))
        self._compiled_draws.update((key, c) for (key, _), c in zip(lowered_draws, compiled[len(lowered):]))
        if self.host_pool is not None:
            self.k_pool, self.v_pool = self.host_pool.warmup(self.k_pool, self.v_pool)
        seconds = time.perf_counter() - start
        log.info("warm-up compiled %d step shapes in %.1f s", len(shapes), seconds)
        return len(shapes), seconds

    def execute(self, output: SchedulerOutput) -> tuple[list[tuple[object, int]], float]:
        """Make the step's swap copies and run it.

        Returns (request, sampled token) for each request that samples, and the seconds the host
        spent issuing swap copies before it could dispatch the step (the swap stall). In a
        multi-host run this is process 0's; it first sends the step's inputs to the other processes.
        """
        return self.collect(self.launch(output))

    def launch(self, output: SchedulerOutput) -> Launched:
        """`execute` without the wait: the step is on its way when this returns."""
        if self.channel is not None and not self.channel.is_sender:
            raise RuntimeError("in a multi-host run only process 0 runs the engine; the other processes call follow()")
        shape, batch, draw, sampled = None, None, None, []
        if output.scheduled:
            shape = self.shape_for(output)
            if self.strict_compile and shape not in self._compiled:
                raise RuntimeError(f"step shape {shape} was not compiled at warm-up")
            batch, sampled = self.prepare(output, shape)
            draw = self._draw_needed(shape, batch)
            if self.strict_compile and draw is not None and draw not in self._compiled_draws:
                raise RuntimeError(f"the draw of {draw[0]} rows (filtered: {draw[1]}) was not compiled at warm-up")
            self._last_step = shape, batch
            self._previous_slots = {req.request_id: i for i, req in enumerate(sampled)}
        if self.channel is not None:
            self.channel.send(_step_message(output.swap_out, output.swap_in, output.host_freed, shape, batch))
        tokens, stall = self._run(output.swap_out, output.swap_in, output.host_freed, shape, batch, draw)
        return Launched(tokens, sampled, stall)

    def collect(self, launched: Launched) -> tuple[list[tuple[object, int]], float]:
        """Wait for a launched step's tokens: what `execute` returns."""
        if not launched.sampled:
            return [], launched.stall
        tokens = np.asarray(launched.tokens)
        if self.channel is not None:   # the step's collectives needed every process: all have read its message
            self.channel.forget_read()
        return list(zip(launched.sampled, tokens[:len(launched.sampled)].tolist())), launched.stall

    def _run(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]], host_freed: list[int],
             shape: StepShape | None, batch: StepBatch | None,
             draw: tuple[int, bool] | None) -> tuple[jax.Array | None, float]:
        """The device side of a step, the same on every process: the swap copies, then the step
        (if `shape`) and its draw (if `draw`, `_draw_needed`), then the host pool forgets the freed
        host blocks. Returns the sampled tokens
        (on device) and the swap stall in seconds."""
        start = time.perf_counter()
        if swap_out:
            self.host_pool.copy_out(self.k_pool, self.v_pool, swap_out)
        if swap_in:
            self.k_pool, self.v_pool = self.host_pool.copy_in(self.k_pool, self.v_pool, swap_in)
        stall = time.perf_counter() - start
        tokens = None
        if shape is not None:
            tokens = self._dispatch(shape, draw, *_packed(batch, draw))
            self._previous_tokens = tokens
        if swap_out:
            self.host_pool.land()
        if host_freed:
            self.host_pool.release(host_freed)
        return tokens, stall

    def _dispatch(self, shape: StepShape, draw: tuple[int, bool] | None, inputs, draw_inputs) -> jax.Array:
        """The step, then its draw if it needs one: returns the sampled tokens, on the device.
        `inputs` and `draw_inputs` are the batch and its sampling parameters, packed (`_packed`)."""
        tokens, logits, self.k_pool, self.v_pool = self.compile(shape)(self._params, self.k_pool, self.v_pool, inputs,
                                                                       self._previous_tokens)
        if draw is not None:
            tokens = self.compile_draw(*draw)(logits, draw_inputs)
        return tokens

    def device_seconds_of_last_step(self, repeats: int = 10, rounds: int = 3) -> float:
        """Seconds the device takes for the last step's compiled computations alone (the step, and
        its draw if it had one): the same shape and inputs (already on the device) run `repeats`
        times back to back, each waiting on the previous one's pools, so the host's scheduling and
        preparation overlap nothing; the fastest of `rounds` rounds, per run. A step's wall time
        minus this is its host time. The runs write the same KV to the same slots as the last step
        did, so the pools keep their values."""
        if self._last_step is None:
            raise RuntimeError("no step has run yet")
        if self.channel is not None:
            raise RuntimeError("timing a step alone is for single-process runs (the other processes would not "
                               "join its collectives)")
        shape, batch = self._last_step
        draw = self._draw_needed(shape, batch)
        inputs = jax.device_put(_packed(batch, draw), NamedSharding(self.mesh, P()))
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                tokens = self._dispatch(shape, draw, *inputs)
            jax.block_until_ready((tokens, self.k_pool, self.v_pool))
            best = min(best, (time.perf_counter() - start) / repeats)
        return best

    def follow(self) -> int:
        """On every process of a multi-host run but 0: make the device calls of process 0's steps
        on this process's devices, in its order, until process 0 closes its runner. Returns the
        number of steps followed."""
        if self.channel is None or self.channel.is_sender:
            raise RuntimeError("follow() is for the processes other than 0 of a multi-host run")
        steps = 0
        while (message := self.channel.receive()) is not None:
            steps += 1
            shape = StepShape(*message["shape"].tolist()) if "shape" in message else None
            batch = draw = None
            if shape is not None:
                template = self.prepare(SchedulerOutput(), shape)[0]
                leaves = [message[f"leaf{i}"] for i in range(len(jax.tree.leaves(template)))]
                batch = jax.tree.unflatten(jax.tree.structure(template), leaves)
                draw = self._draw_needed(shape, batch)
            self._run(_pairs(message["swap_out"]), _pairs(message["swap_in"]), message["host_freed"].tolist(),
                      shape, batch, draw)
        return steps

    def close(self) -> None:
        """Multi-host, on process 0: tell the other processes to stop following."""
        if self.channel is not None and self.channel.is_sender:
            self.channel.send(None)
            self.channel = None


def _greedy_sampling(num_samples: int) -> SamplingBatch:
    """Sampling parameters of `num_samples` greedy rows (the padding rows keep them)."""
    return SamplingBatch(temperature=np.zeros(num_samples, np.float32), top_k=np.zeros(num_samples, np.int32),
                         top_p=np.ones(num_samples, np.float32), seeds=np.zeros(num_samples, np.uint32),
                         steps=np.zeros(num_samples, np.int32))


def _packed(batch: StepBatch, draw: tuple[int, bool] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A step's inputs as one buffer, and its draw's (the sampling parameters) if it has one."""
    return Packing.buffer(batch), None if draw is None else Packing.buffer(batch.sampling)


def _step_message(swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]], host_freed: list[int],
                  shape: StepShape | None, batch: StepBatch | None) -> dict[str, np.ndarray]:
    """A step's runner inputs as named arrays: the copies' block pairs, the freed host blocks, the
    shape and the batch's leaves."""
    message = {"swap_out": np.array(swap_out, np.int64).reshape(-1, 2),
               "swap_in": np.array(swap_in, np.int64).reshape(-1, 2),
               "host_freed": np.array(host_freed, np.int64)}
    if shape is not None:
        message["shape"] = np.array(astuple(shape), np.int64)
        message.update((f"leaf{i}", leaf) for i, leaf in enumerate(jax.tree.leaves(batch)))
    return message


def _pairs(array: np.ndarray) -> list[tuple[int, int]]:
    return [tuple(pair) for pair in array.tolist()]
