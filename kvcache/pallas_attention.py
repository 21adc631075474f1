"""Paged attention as one Pallas kernel per row group: the GPU path of `kvcache.paged`.

The portable path walks the context in an XLA loop whose trip count is a traced value; on a GPU
that loop syncs with the host at every iteration of every layer (the first H200 run: about 1 ms per
128-token chunk per step). Here the whole context walk is inside the kernel: one program per (row,
KV head) loads the row's queries for that head (its query tokens times the heads sharing the KV
head, packed into one tile of at least 16 rows), then reads the row's pages `pages_per_block` at
a time straight from the page-major pool (`k_ref[pages]`, a gather of whole pages) and keeps an
online softmax in float32. The loop's bound, the row's longest position, is read on the device, so
a step costs what its contexts need and no context length enters the compiled shape.

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


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _kernel(layer_ref, positions_ref, table_ref, q_ref, k_ref, v_ref, o_ref, *,
            pages_per_block: int, pages_per_layer: int, scale: float):
    """One (row, KV head): q [M, D] against the row's pages; writes o [M, D] float32."""
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
    init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = acc / jnp.maximum(l, 1e-30)[:, None]


def attend_rows(q_padded: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array,
                row_token_index: jax.Array, row_positions: jax.Array, block_tables: jax.Array,
                pages_per_block: int, *, interpret: bool | None = None, num_warps: int = 4,
                num_stages: int = 2) -> jax.Array:
    """The rows [R, Q] of one group against the pools: returns [R * Q, H, D] float32.

    `q_padded` is [T + 1, H, D] (the last entry is the padding rows' query). `interpret` (None:
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
    pool_spec = pl.BlockSpec((num_layers * blocks_per_layer, block_size, None, head_dim), lambda r, h: (0, 0, h, 0))
    kernel = functools.partial(_kernel, pages_per_block=pages_per_block, pages_per_layer=blocks_per_layer,
                               scale=head_dim ** -0.5)
    out = pl.pallas_call(
        kernel,
        grid=(rows, num_kv_heads),
        in_specs=[
            pl.BlockSpec((1,), lambda r, h: (0,)),                                   # layer
            pl.BlockSpec((None, tile), lambda r, h: (r, 0)),                         # positions
            pl.BlockSpec((None, block_tables.shape[1]), lambda r, h: (r, 0)),        # block table
            pl.BlockSpec((None, None, tile, head_dim), lambda r, h: (r, h, 0, 0)),   # q
            pool_spec, pool_spec,
        ],
        out_specs=pl.BlockSpec((None, None, tile, head_dim), lambda r, h: (r, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, num_kv_heads, tile, head_dim), jnp.float32),
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="paged_attention_rows",
    )(layer, positions, block_tables, q, k_pages, v_pages)
    out = out[:, :, :entries].reshape(rows, num_kv_heads, width, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(rows * width, num_heads, head_dim)
