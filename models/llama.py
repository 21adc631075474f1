"""Llama family in Flax NNX (Llama-2/3, SmolLM2, TinyLlama, Vicuna).

RMSNorm, rotate-half RoPE (with the llama3 frequency scaling), GQA, SwiGLU, tied or untied head.
The layers' weights are stacked on a leading axis and the forward scans over them, so compile
time does not grow with depth. Attention reads and writes the paged KV pools, which are plain
arrays passed in and returned (the runner donates them), never module state.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvcache.paged import AttentionInputs, paged_attention, write_kv
from models.spec import ModelSpec

# our stacked layer weight -> the HF weights (inside model.layers.{i}) concatenated along the output
# axis; linear weights are stored [in, out]. q/k/v and gate/up are fused: one wider matmul each.
_LAYER_WEIGHTS = {
    "attn_norm": ["input_layernorm.weight"],
    "wqkv": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "wo": ["self_attn.o_proj.weight"],
    "mlp_norm": ["post_attention_layernorm.weight"],
    "w_gate_up": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "w_down": ["mlp.down_proj.weight"],
}


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2], with llama3 scaling when the spec has it."""
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim))
    rs = spec.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = np.where(medium, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, H, D]; cos/sin [T, D] (HF rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


class Llama(nnx.Module):
    """A Llama decoder. `__call__` runs a flat ragged batch of query tokens through the paged KV."""

    def __init__(self, spec: ModelSpec, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.spec = spec
        self.dtype = dtype
        rngs = rngs or nnx.Rngs(0)
        L, D, F = spec.num_layers, spec.hidden_size, spec.intermediate_size
        hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim

        def dense(*shape):
            return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02).astype(dtype))

        self.embed = dense(spec.vocab_size, D)
        self.attn_norm = nnx.Param(jnp.ones((L, D), dtype))
        self.wqkv, self.wo = dense(L, D, hq + 2 * hkv), dense(L, hq, D)
        self.mlp_norm = nnx.Param(jnp.ones((L, D), dtype))
        self.w_gate_up, self.w_down = dense(L, D, 2 * F), dense(L, F, D)
        self.final_norm = nnx.Param(jnp.ones((D,), dtype))
        self.lm_head = None if spec.tie_word_embeddings else dense(D, spec.vocab_size)
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(spec)))

    @classmethod
    def from_hf_weights(cls, spec: ModelSpec, tensors: dict[str, np.ndarray], *, dtype=jnp.float32) -> "Llama":
        """Build from HF-named tensors ([out, in] linear weights), stacking the layers."""
        model = nnx.eval_shape(lambda: cls(spec, dtype=dtype, rngs=nnx.Rngs(0)))

        def take(name: str) -> np.ndarray:
            if name not in tensors:
                raise ValueError(f"weights are missing {name!r}")
            return tensors[name]

        def put(arr: np.ndarray) -> jax.Array:
            return jnp.asarray(np.asarray(arr, np.float32)).astype(dtype)

        for ours, hf_names in _LAYER_WEIGHTS.items():
            stacked = np.stack([np.concatenate([take(f"model.layers.{i}.{hf}") for hf in hf_names])
                                for i in range(spec.num_layers)])
            getattr(model, ours).set_value(put(stacked.swapaxes(1, 2) if stacked.ndim == 3 else stacked))
        model.embed.set_value(put(take("model.embed_tokens.weight")))
        model.final_norm.set_value(put(take("model.norm.weight")))
        if not spec.tie_word_embeddings:
            model.lm_head.set_value(put(take("lm_head.weight").T))
        model.inv_freq.set_value(jnp.asarray(rope_inv_freq(spec)))
        return model

    def __call__(self, token_ids: jax.Array, positions: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                 meta: AttentionInputs, pages_per_chunk: int):
        """Hidden states [T, D] after the final norm, and the updated pools."""
        spec = self.spec
        num_tokens = token_ids.shape[0]
        h = self.embed[...][token_ids]
        freqs = positions.astype(jnp.float32)[:, None] * self.inv_freq[...][None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        layer_weights = {name: getattr(self, name)[...] for name in _LAYER_WEIGHTS}

        def layer(carry, xs):
            h, k_pool, v_pool = carry
            w, idx = xs
            x = rms_norm(h, w["attn_norm"], spec.rms_norm_eps)
            q, k, v = self.split_qkv(x @ w["wqkv"])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_pool = write_kv(k_pool, idx, meta.slot_mapping, k)
            v_pool = write_kv(v_pool, idx, meta.slot_mapping, v)
            attn = paged_attention(q, k_pool, v_pool, idx, meta, pages_per_chunk)
            h = h + attn.reshape(num_tokens, -1) @ w["wo"]
            x = rms_norm(h, w["mlp_norm"], spec.rms_norm_eps)
            gate, up = jnp.split(x @ w["w_gate_up"], 2, axis=-1)
            h = h + (jax.nn.silu(gate) * up) @ w["w_down"]
            return (h, k_pool, v_pool), None

        layer_ids = jnp.arange(spec.num_layers, dtype=jnp.int32)
        (h, k_pool, v_pool), _ = jax.lax.scan(layer, (h, k_pool, v_pool), (layer_weights, layer_ids))
        return rms_norm(h, self.final_norm[...], spec.rms_norm_eps), k_pool, v_pool

    def split_qkv(self, qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[T, (H + 2 Hkv) * D] -> q [T, H, D], k and v [T, Hkv, D]."""
        spec = self.spec
        hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        n = qkv.shape[0]
        return (qkv[:, :hq].reshape(n, spec.num_heads, spec.head_dim),
                qkv[:, hq:hq + hkv].reshape(n, spec.num_kv_heads, spec.head_dim),
                qkv[:, hq + hkv:].reshape(n, spec.num_kv_heads, spec.head_dim))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[N, D] -> float32 logits [N, V]."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return (hidden @ head).astype(jnp.float32)
