"""Paged attention as one Pallas kernel per row group: the GPU path of `kvcache.paged`.

The portable path walks the context in an XLA loop whose trip count is a traced value; on a GPU
that loop syncs with the host at every iteration of every layer (the first H200 run: about 1 ms per
128-token chunk per step). Here the whole context walk is inside the kernel: one program per (row,
KV head) loads the row's queries for that head (its query tokens times the heads sharing the KV
head, packed into one tile of at least 16 rows), then reads the row's pages `pages_per_block` at
a time straight from the page-major pool (`k_ref[pages]`, a gather of whole pages) and keeps an
online softmax in float32. The loop's bound, the row's longest position, is read on the device, so
a step costs what its contexts need and no context length enters the compiled shape.

When the rows and KV heads alone give too few programs to fill the GPU (a batch-1 decode has one
per KV head: 32 programs on the H200's 132 SMs), each (row, KV head) is split along its context
into `kv_splits` programs (split-K, as in flash-decoding): each walks its share of the row's pages
and writes its unnormalized output with its softmax max and sum, and one XLA step combines them.
The share is computed on the device from the row's last position, so a short context splits as
evenly as a long one.

The kernel is written for Pallas's Triton lowering (GPU). Everywhere else it runs in Pallas's
interpret mode, which is how CPU tests check it against the portable path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = -1e30
MIN_TILE_ROWS = 16   # Triton's dot wants at least 16 rows
TARGET_PROGRAMS = 264   # two waves of an H100's or H200's 132 SMs
MAX_KV_SPLITS = 16


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def kv_splits(rows: int, num_kv_heads: int, max_iterations: int) -> int:
    """Programs per (row, KV head): 1 where `rows * num_kv_heads` programs fill the GPU, else as
    many as bring the grid to `TARGET_PROGRAMS`, at most one per iteration a row may have and at
    most `MAX_KV_SPLITS` (every split adds a partial output the combine reads back)."""
    return max(1, min(TARGET_PROGRAMS // (rows * num_kv_heads), max_iterations, MAX_KV_SPLITS))


def _kernel(layer_ref, positions_ref, table_ref, q_ref, k_ref, v_ref, *out_refs,
            pages_per_block: int, pages_per_layer: int, scale: float, splits: int):
    """One (row, KV head, split): q [M, D] against the split's share of the row's pages. With one
    split it writes the output o [M, D] float32; with more, the unnormalized o and the softmax's
    running max m [M] and sum l [M] for the combine."""
    block_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    block_tokens = pages_per_block * block_size
    positions = positions_ref[...]                          # [M], padding -1
    q = q_ref[...]
    first_page = layer_ref[0] * pages_per_layer

    def body(i, carry):
        m, l, acc = carry
        pages = table_ref[pl.ds(i * pages_per_block, pages_per_block)] + first_page
        k = k_ref[pages].reshape(block_tokens, head_dim)
        v = v_ref[pages].reshape(block_tokens, head_dim)
        s = plgpu.dot(q, k, trans_b=True, allow_tf32=False).astype(jnp.float32) * scale
        key_positions = i * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        visible = key_positions[None, :] <= positions[:, None]
        s = jnp.where(visible, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=1)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, allow_tf32=False).astype(jnp.float32)
        return m_new, l, acc

    rows = q.shape[0]
    num_blocks = pl.cdiv(jnp.max(positions) + 1, block_tokens)
    per_split = pl.cdiv(num_blocks, splits)
    start = pl.program_id(2) * per_split
    stop = jnp.minimum(start + per_split, num_blocks)
    init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    m, l, acc = jax.lax.fori_loop(start, stop, body, init)
    if splits == 1:
        out_refs[0][...] = acc / jnp.maximum(l, 1e-30)[:, None]
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _combine(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """The splits' partial outputs [..., S, M, D] (maxes and sums [..., S, M]) as one output [..., M, D]."""
    weight = jnp.exp(m - m.max(axis=-2, keepdims=True))        # an empty split: m = -1e30, weight 0
    total = (weight * l).sum(axis=-2)
    return (weight[..., None] * o).sum(axis=-3) / jnp.maximum(total, 1e-30)[..., None]


def attend_rows(q_padded: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array,
                row_token_index: jax.Array, row_positions: jax.Array, block_tables: jax.Array,
                pages_per_block: int, *, splits: int | None = None, interpret: bool | None = None,
                num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """The rows [R, Q] of one group against the pools: returns [R * Q, H, D] float32.

    `q_padded` is [T + 1, H, D] (the last entry is the padding rows' query). `splits` (None:
    `kv_splits` of the group's shape) is the programs per (row, KV head). `interpret` (None:
    everywhere but on a GPU) runs the kernel in Pallas's interpreter."""
    num_heads, head_dim = q_padded.shape[1:]
    num_layers, blocks_per_layer, block_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    rows, width = row_token_index.shape
    entries = width * group
    tile = max(MIN_TILE_ROWS, _next_pow2(entries))

    # [R, Q, Hkv, G, D] -> [R, Hkv, Q * G, D]: a KV head's queries of every token of the row in one tile.
    q = q_padded[row_token_index].reshape(rows, width, num_kv_heads, group, head_dim)
    q = q.transpose(0, 2, 1, 3, 4).reshape(rows, num_kv_heads, entries, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, tile - entries), (0, 0)))
    positions = jnp.repeat(row_positions, group, axis=1)
    positions = jnp.pad(positions, ((0, 0), (0, tile - entries)), constant_values=-1)
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)
    # Pages as rows of a [layers * blocks, ...] view (a free reshape): the kernel adds the layer's offset.
    k_pages = k_pool.reshape(num_layers * blocks_per_layer, block_size, num_kv_heads, head_dim)
    v_pages = v_pool.reshape(num_layers * blocks_per_layer, block_size, num_kv_heads, head_dim)
    if splits is None:
        splits = kv_splits(rows, num_kv_heads, pl.cdiv(block_tables.shape[1], pages_per_block))
    pool_spec = pl.BlockSpec((num_layers * blocks_per_layer, block_size, None, head_dim), lambda r, h, s: (0, 0, h, 0))
    kernel = functools.partial(_kernel, pages_per_block=pages_per_block, pages_per_layer=blocks_per_layer,
                               scale=head_dim ** -0.5, splits=splits)
    out_specs = [pl.BlockSpec((None, None, None, tile, head_dim), lambda r, h, s: (r, h, s, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((rows, num_kv_heads, splits, tile, head_dim), jnp.float32)]
    if splits > 1:   # each split's softmax max and sum, for the combine
        out_specs += [pl.BlockSpec((None, None, None, tile), lambda r, h, s: (r, h, s, 0))] * 2
        out_shape += [jax.ShapeDtypeStruct((rows, num_kv_heads, splits, tile), jnp.float32)] * 2
    outs = pl.pallas_call(
        kernel,
        grid=(rows, num_kv_heads, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda r, h, s: (0,)),                                   # layer
            pl.BlockSpec((None, tile), lambda r, h, s: (r, 0)),                         # positions
            pl.BlockSpec((None, block_tables.shape[1]), lambda r, h, s: (r, 0)),        # block table
            pl.BlockSpec((None, None, tile, head_dim), lambda r, h, s: (r, h, 0, 0)),   # q
            pool_spec, pool_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="paged_attention_rows",
    )(layer, positions, block_tables, q, k_pages, v_pages)
    out = outs[0][:, :, 0] if splits == 1 else _combine(*outs)
    out = out[:, :, :entries].reshape(rows, num_kv_heads, width, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(rows * width, num_heads, head_dim)


def compile_error(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, pages_per_block: int,
                  row_width: int, dtype) -> Exception | None:
    """Compile the kernel (not interpreted) on the default backend for a decode row group split
    along its context and a chunk row group in one pass, of these shapes: None if both compile,
    else the error. Triton compiles for the GPU only there, on the machine itself, so
    `attention="auto"` asks before it commits to the kernel."""
    pool = jax.ShapeDtypeStruct((1, 8, block_size, num_kv_heads, head_dim), dtype)
    table = (4 * pages_per_block,)
    try:
        for rows, width, splits in ((1, 1, 2), (2, row_width, 1)):
            index = jax.ShapeDtypeStruct((rows, width), jnp.int32)
            jax.jit(functools.partial(attend_rows, pages_per_block=pages_per_block, splits=splits,
                                      interpret=False)).lower(
                jax.ShapeDtypeStruct((rows * width + 1, num_heads, head_dim), dtype), pool, pool,
                jax.ShapeDtypeStruct((), jnp.int32), index, index,
                jax.ShapeDtypeStruct((rows,) + table, jnp.int32)).compile()
    except Exception as error:  # noqa: BLE001 - whatever the reason, the kernel is not for this machine
        return error
    return None
