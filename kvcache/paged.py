"""Device side of the paged KV cache: pool allocation, slot scatter, paged attention read.

Pool layout, stacked over layers and page-major: `[num_layers, num_blocks, block_size,
num_kv_heads, head_dim]`, one array for K and one for V. Writes scatter new K/V by a flat slot
(`block * block_size + offset`); padding tokens write into the reserved block 0.

The attention read works on *rows*: a row is up to `Q` query tokens of one sequence with that
sequence's block table. Rows come in groups of one width each (a step that mixes decodes with
prefill chunks has a group of 1-token rows beside a group of chunk rows, so a decode is not padded
to a chunk's width). Each group walks the context in chunks of `pages_per_chunk` pages with an
online softmax, and the number of chunks is a traced value (the group's longest context), so a step
costs what its contexts need and the context length never changes the compiled shape. This is the
portable path and the reference; `kernel="pallas"` runs each group through the Pallas kernel of
`kvcache.pallas_attention` instead (the GPU path: no XLA loop, hence no host sync per chunk).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvcache import pallas_attention

_NEG = -1e30
ATTENTION_KERNELS = ("xla", "pallas")


class RowGroup(NamedTuple):
    """R attention rows of width Q (all int32)."""

    row_token_index: jax.Array   # [R, Q] flat token index of each row entry (padding -> T)
    row_positions: jax.Array     # [R, Q] absolute position of each row entry (padding -> -1)
    block_tables: jax.Array      # [R, W] block ids of each row's sequence (padding -> 0)
    num_chunks: jax.Array        # [] ceil(longest context in the group / chunk tokens)


class AttentionInputs(NamedTuple):
    """Per-step metadata for the paged attention of every layer (all int32)."""

    slot_mapping: jax.Array      # [T] flat KV slot of each query token (padding -> block 0)
    token_row_index: jax.Array   # [T] index of each token's entry in the groups' R*Q entries, concatenated
    groups: tuple[RowGroup, ...]


def allocate_pools(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int, dtype, sharding=None) -> tuple[jax.Array, jax.Array]:
    """Zeroed K and V pools, created directly on device (no host round trip)."""
    shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return make(), make()


def write_kv(pool: jax.Array, layer: jax.Array, slot_mapping: jax.Array, new: jax.Array) -> jax.Array:
    """Scatter `new` [T, Hkv, D] into `pool[layer]` at the flat slots."""
    block_size = pool.shape[2]
    return pool.at[layer, slot_mapping // block_size, slot_mapping % block_size].set(new.astype(pool.dtype))


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array,
                    meta: AttentionInputs, pages_per_chunk: int, kernel: str = "xla",
                    kv_splits: int | None = None) -> jax.Array:
    """Causal attention of flat queries `q` [T, H, D] against their sequences' paged KV.

    Returns [T, H, D]. Row entries see keys at positions `<=` their own position. `kernel` is one
    of `ATTENTION_KERNELS`: the XLA loop below, or the Pallas kernel (which reads `pages_per_chunk`
    pages per iteration too, with `kv_splits` programs per row and KV head; None: its own choice).
    """
    q_padded = jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], q.dtype)])
    if kernel == "pallas":
        outs = [pallas_attention.attend_rows(q_padded, k_pool, v_pool, layer, group.row_token_index,
                                             group.row_positions, group.block_tables, pages_per_chunk,
                                             splits=kv_splits)
                for group in meta.groups]
    elif kernel == "xla":
        outs = [_attend_rows(q_padded, k_pool, v_pool, layer, group, pages_per_chunk) for group in meta.groups]
    else:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    return jnp.concatenate(outs)[meta.token_row_index].astype(q.dtype)


def _attend_rows(q_padded: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array,
                 group: RowGroup, pages_per_chunk: int) -> jax.Array:
    """One row group: returns [R * Q, H, D] float32."""
    num_heads, head_dim = q_padded.shape[1:]
    num_kv_heads, block_size = k_pool.shape[3], k_pool.shape[2]
    kv_group = num_heads // num_kv_heads
    rows, width = group.row_token_index.shape
    chunk = pages_per_chunk * block_size

    q_rows = q_padded[group.row_token_index].reshape(rows, width, num_kv_heads, kv_group, head_dim)
    q_rows = q_rows.astype(jnp.float32) * (head_dim ** -0.5)
    # Pages as rows of a [layers * blocks, page...] view: a gather of whole contiguous pages, which
    # XLA:CPU runs about a quarter faster than indexing [layer, pages] of the 5-D pool. The KV-head
    # axis stays an axis of its own, so a pool split over KV heads stays split (no all-gather).
    num_blocks = k_pool.shape[1]
    k_pages = k_pool.reshape(-1, block_size, num_kv_heads, head_dim)
    v_pages = v_pool.reshape(-1, block_size, num_kv_heads, head_dim)

    def body(c, carry):
        m, l, acc = carry
        pages = layer * num_blocks + jax.lax.dynamic_slice_in_dim(
            group.block_tables, c * pages_per_chunk, pages_per_chunk, axis=1)
        k = jnp.take(k_pages, pages, axis=0).reshape(rows, chunk, num_kv_heads, head_dim).astype(jnp.float32)
        v = jnp.take(v_pages, pages, axis=0).reshape(rows, chunk, num_kv_heads, head_dim).astype(jnp.float32)
        s = jnp.einsum("rqhgd,rkhd->rhgqk", q_rows, k)
        key_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        visible = key_pos[None, None, :] <= group.row_positions[:, :, None]     # [R, Q, K]
        s = jnp.where(visible[:, None, None], s, _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(visible[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        l = l * scale + p.sum(-1)
        acc = acc * scale[..., None] + jnp.einsum("rhgqk,rkhd->rhgqd", p, v)
        return m_new, l, acc

    init = (jnp.full((rows, num_kv_heads, kv_group, width), _NEG, jnp.float32),
            jnp.zeros((rows, num_kv_heads, kv_group, width), jnp.float32),
            jnp.zeros((rows, num_kv_heads, kv_group, width, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, group.num_chunks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]                                # [R, Hkv, G, Q, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(rows * width, num_heads, head_dim)
