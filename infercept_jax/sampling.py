"""Token sampling on device: greedy, temperature, top-k, top-p, seeded per request.

Each row's randomness comes from `fold_in(key(seed), step)`, so a request's tokens do not depend
on which other requests share its batch.

Which work a batch needs is decided on the host, from its sampling parameters (`sampling_mode`),
not by a `lax.cond` on the device: XLA:GPU copies a cond's predicate to the host and waits for it,
a stall inside every step. The step itself takes the greedy tokens; a batch that draws runs
`sample` on the step's logits, compiled once without and once with the top-k/top-p filter.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

GREEDY, RANDOM, FILTERED = "greedy", "random", "filtered"


class SamplingBatch(NamedTuple):
    temperature: jax.Array   # [B], 0 for greedy
    top_k: jax.Array         # [B], 0 for all
    top_p: jax.Array         # [B], 1 for all
    seeds: jax.Array         # [B]
    steps: jax.Array         # [B] tokens the request generated so far (folds into its key)


def sampling_mode(batch: SamplingBatch) -> str:
    """GREEDY when no row draws, FILTERED when a row that draws has top-k or top-p, else RANDOM.

    Host-side (numpy): the mode picks the compiled sampler, so the device never branches."""
    draws = np.asarray(batch.temperature) > 0.0
    if not draws.any():
        return GREEDY
    filters = (np.asarray(batch.top_k) > 0) | (np.asarray(batch.top_p) < 1.0)
    return FILTERED if (draws & filters).any() else RANDOM


def greedy(logits: jax.Array) -> jax.Array:
    """logits [B, V] -> the most likely token of each row [B]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


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


def sample(logits: jax.Array, batch: SamplingBatch, filtered: bool) -> jax.Array:
    """logits [B, V] float32 -> token ids [B]: a draw at each row's temperature (greedy where it is
    0), from its top-k/top-p nucleus if `filtered` (a static choice: `sampling_mode`)."""
    scaled = logits / jnp.maximum(batch.temperature, 1e-6)[:, None]
    if filtered:
        scaled = _filter_top_k_top_p(scaled, batch.top_k, batch.top_p)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(batch.seeds, batch.steps)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(batch.temperature <= 0.0, greedy(logits), sampled)
