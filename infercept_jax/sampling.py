"""Token sampling on device: greedy, temperature, top-k, top-p, seeded per request.

Each row's randomness comes from `fold_in(key(seed), step)`, so a request's tokens do not depend
on which other requests share its batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask logits outside each row's top-k, then outside its top-p nucleus (HF order)."""
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    sorted_desc = jnp.where(rank < k, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    exclusive_cum = jnp.cumsum(probs, axis=-1) - probs
    keep = (exclusive_cum < top_p[:, None]) & (rank < k)
    last_kept = jnp.maximum(keep.sum(-1) - 1, 0)
    threshold = jnp.take_along_axis(sorted_desc, last_kept[:, None], axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """logits [B, V] float32 -> token ids [B]. temperature 0 means greedy.

    An all-greedy batch skips the random draws (threefry over the vocabulary is not free on CPU).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
        scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda x, *_: x, scaled, top_k, top_p)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
        sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature <= 0.0, greedy, sampled)

    return jax.lax.cond(jnp.all(temperature <= 0.0), lambda _: greedy, draw, logits)
