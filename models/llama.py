"""Llama family in Flax NNX (Llama-2/3, SmolLM2, TinyLlama, Vicuna).

RMSNorm, rotate-half RoPE (with the llama3 frequency scaling), GQA, SwiGLU, tied or untied head.
The layers' weights are stacked on a leading axis and the forward scans over them, so compile
time does not grow with depth. Attention reads and writes the paged KV pools, which are plain
arrays passed in and returned (the runner donates them), never module state.

Tensor parallelism (Megatron): every weight has a `PartitionSpec` over the mesh axis `tp`
(`PARAM_SPECS`). q/k/v and gate/up are split by output (heads, MLP units), o and down by input
rows, the embedding and the untied head by vocabulary. The fused weights keep their parts on
axes of their own (`wqkv` is [D, kv_heads, group + 2, head_dim]: a KV head's query heads, its key,
its value), so a split along KV heads or MLP units gives every device whole heads and units, with
the same layout for any number of devices.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from kvcache.paged import AttentionInputs, paged_attention, write_kv
from models.spec import ModelSpec

TP = "tp"   # the mesh axis tensor parallelism splits over

# Each weight's split over the mesh (stacked layer weights have the layer axis first).
PARAM_SPECS = {
    "embed": P(TP, None),                          # [V, D] by vocabulary
    "attn_norm": P(), "mlp_norm": P(), "final_norm": P(), "inv_freq": P(),
    "wqkv": P(None, None, TP, None, None),         # [L, D, Hkv, G + 2, Dh] by KV head
    "wo": P(None, TP, None),                       # [L, H * Dh, D] by input rows (heads)
    "w_gate_up": P(None, None, None, TP),          # [L, D, 2, F] by MLP unit
    "w_down": P(None, TP, None),                   # [L, F, D] by input rows (MLP units)
    "lm_head": P(None, TP),                        # [D, V] by vocabulary
}

KV_POOL_SPEC = P(None, None, None, TP, None)   # the KV pools [layers, blocks, block_size, KV heads, head_dim]

# Our stacked layer weights, in the forward's order.
LAYER_WEIGHTS = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down")


def matmul_precision(dtype) -> contextlib.AbstractContextManager:
    """The matmul precision to trace a model of `dtype` under: a float32 model multiplies in full
    float32 (JAX's GPU default for float32 is TF32, a 10-bit mantissa, which would make a float32
    engine disagree with float32 references); other dtypes keep JAX's default. CPU multiplies
    float32 in float32 either way."""
    if np.dtype(dtype) == np.float32:
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


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


def swiglu(x: jax.Array, w_gate_up: jax.Array) -> jax.Array:
    """x [T, D], w_gate_up [D, 2, F] -> silu(x @ gate) * (x @ up), [T, F]."""
    gate_up = jnp.einsum("td,dkf->tkf", x, w_gate_up)
    return jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]


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
        hq = spec.num_heads * spec.head_dim

        def dense(*shape):
            return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02).astype(dtype))

        self.embed = dense(spec.vocab_size, D)
        self.attn_norm = nnx.Param(jnp.ones((L, D), dtype))
        group = spec.num_heads // spec.num_kv_heads
        self.wqkv, self.wo = dense(L, D, spec.num_kv_heads, group + 2, spec.head_dim), dense(L, hq, D)
        self.mlp_norm = nnx.Param(jnp.ones((L, D), dtype))
        self.w_gate_up, self.w_down = dense(L, D, 2, F), dense(L, F, D)
        self.final_norm = nnx.Param(jnp.ones((D,), dtype))
        self.lm_head = None if spec.tie_word_embeddings else dense(D, spec.vocab_size)
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(spec)))

    @classmethod
    def abstract(cls, spec: ModelSpec, dtype=jnp.float32) -> "Llama":
        """The model's structure with shapes and dtypes and no values (nothing allocated), to fill in."""
        return nnx.eval_shape(lambda: cls(spec, dtype=dtype, rngs=nnx.Rngs(0)))

    @classmethod
    def from_hf_weights(cls, spec: ModelSpec, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                        mesh: Mesh | None = None) -> "Llama":
        """Build from HF-named tensors ([out, in] linear weights, any float dtype; a lazy mapping
        such as `SafetensorsWeights` is read one tensor at a time, each once), every weight placed
        by its `PARAM_SPECS` split over `mesh` (None: the default device). A layer's weights are
        built once on the host, in the target dtype, and each device gets its slice of them: the
        host holds one layer at a time (and the embedding), and the work does not grow with the
        number of devices."""
        missing = sorted(set(hf_weight_names(spec)) - set(tensors))
        if missing:
            raise ValueError(f"weights are missing {missing[0]!r}" + (f" and {len(missing) - 1} more" if missing[1:] else ""))
        target = np.dtype(dtype)

        def place(array: np.ndarray, sharding) -> jax.Array:
            return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

        def layer(i: int) -> dict[str, jax.Array]:
            hf = lambda name: tensors[f"model.layers.{i}.{name}"]  # noqa: E731
            return {name: place(np.asarray(_layer_weight(spec, name, hf), target), layer_sharding(name, mesh))
                    for name in LAYER_WEIGHTS}

        whole = {"embed": tensors["model.embed_tokens.weight"], "final_norm": tensors["model.norm.weight"]}
        if not spec.tie_word_embeddings:
            whole["lm_head"] = tensors["lm_head.weight"].T
        whole = {name: place(np.asarray(t, target), param_sharding(name, mesh)) for name, t in whole.items()}
        whole["inv_freq"] = place(rope_inv_freq(spec), param_sharding("inv_freq", mesh))
        return cls.from_parts(spec, whole, layer, dtype=dtype, mesh=mesh)

    @classmethod
    def from_parts(cls, spec: ModelSpec, whole: Mapping[str, jax.Array],
                   layer: Callable[[int], Mapping[str, jax.Array]], *, dtype=jnp.float32,
                   mesh: Mesh | None = None) -> "Llama":
        """A model from its unstacked weights (`whole`: embed, final_norm, inv_freq and an untied
        lm_head, placed by `param_sharding`) and `layer(i)`, layer i's part of each stacked weight
        (`LAYER_WEIGHTS`, placed by `layer_sharding`). A stacked weight starts as zeros on the
        devices and each layer is written into it in place (donated), one layer at a time, so
        loading never holds a second copy of a stacked weight."""
        model = cls.abstract(spec, dtype)
        stacked = {name: jnp.zeros(getattr(model, name).shape, dtype, device=param_sharding(name, mesh))
                   for name in LAYER_WEIGHTS}
        for i in range(spec.num_layers):
            for name, part in layer(i).items():
                stacked[name] = _write_layer(stacked[name], part, i)
        for name, array in {**whole, **stacked}.items():
            getattr(model, name).set_value(array)
        return model

    def weights(self) -> dict[str, jax.Array]:
        """Every weight by its `PARAM_SPECS` name (an untied head only if the model has one)."""
        return {name: getattr(self, name).get_value() for name in PARAM_SPECS if getattr(self, name) is not None}

    def shard(self, mesh: Mesh | None) -> None:
        """Move every weight to its split over `mesh` (None: the default device), in place."""
        for name in PARAM_SPECS:
            variable = getattr(self, name)
            if variable is not None:
                variable.set_value(jax.device_put(variable[...], param_sharding(name, mesh)))

    def __call__(self, token_ids: jax.Array, positions: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                 meta: AttentionInputs, pages_per_chunk: int, attention: str = "xla", mesh: Mesh | None = None):
        """Hidden states [T, D] after the final norm, and the updated pools. `attention` is the
        paged attention's kernel (`kvcache.paged.ATTENTION_KERNELS`); `mesh` is the one the weights
        and pools are split over (None: one device)."""
        spec = self.spec
        attend = partial(paged_attention, pages_per_chunk=pages_per_chunk, kernel=attention)
        if attention == "pallas" and mesh is not None and mesh.size > 1:
            # A kernel is opaque to XLA's partitioner, which would gather the whole pool to each
            # device: each device runs it on its own heads and its own part of the pools instead.
            heads = P(None, TP, None)
            attend = jax.shard_map(attend, mesh=mesh, in_specs=(heads, KV_POOL_SPEC, KV_POOL_SPEC, P(), P()),
                                   out_specs=heads, check_vma=False)
        num_tokens = token_ids.shape[0]
        h = self.embed[...][token_ids]
        freqs = positions.astype(jnp.float32)[:, None] * self.inv_freq[...][None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        layer_weights = {name: getattr(self, name)[...] for name in LAYER_WEIGHTS}

        def layer(carry, xs):
            h, k_pool, v_pool = carry
            w, idx = xs
            x = rms_norm(h, w["attn_norm"], spec.rms_norm_eps)
            q, k, v = self.project_qkv(x, w["wqkv"])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_pool = write_kv(k_pool, idx, meta.slot_mapping, k)
            v_pool = write_kv(v_pool, idx, meta.slot_mapping, v)
            attn = attend(q, k_pool, v_pool, idx, meta)
            h = h + attn.reshape(num_tokens, -1) @ w["wo"]
            x = rms_norm(h, w["mlp_norm"], spec.rms_norm_eps)
            h = h + swiglu(x, w["w_gate_up"]) @ w["w_down"]
            return (h, k_pool, v_pool), None

        layer_ids = jnp.arange(spec.num_layers, dtype=jnp.int32)
        (h, k_pool, v_pool), _ = jax.lax.scan(layer, (h, k_pool, v_pool), (layer_weights, layer_ids))
        return rms_norm(h, self.final_norm[...], spec.rms_norm_eps), k_pool, v_pool

    def project_qkv(self, x: jax.Array, wqkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, D] -> q [T, H, Dh], k and v [T, Hkv, Dh] with one matmul."""
        qkv = jnp.einsum("td,dhgk->thgk", x, wqkv)                 # [T, Hkv, G + 2, Dh]
        group = qkv.shape[2] - 2
        q = qkv[:, :, :group].reshape(x.shape[0], self.spec.num_heads, self.spec.head_dim)
        return q, qkv[:, :, group], qkv[:, :, group + 1]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[N, D] -> float32 logits [N, V]."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return (hidden @ head).astype(jnp.float32)


def param_sharding(name: str, mesh: Mesh | None):
    """Where weight `name` lives: split by `PARAM_SPECS` over `mesh`, or on the default device."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PARAM_SPECS[name])


def layer_sharding(name: str, mesh: Mesh | None):
    """Where one layer of stacked weight `name` lives: its split less the layer axis."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, P(*PARAM_SPECS[name][1:]))


@partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer: jax.Array, i: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)


def hf_weight_names(spec: ModelSpec) -> list[str]:
    """The HF tensor names a checkpoint of `spec` must have."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if spec.tie_word_embeddings else ["lm_head.weight"])
    per_layer = ["input_layernorm", "post_attention_layernorm"] + [f"self_attn.{p}_proj" for p in "qkvo"] + \
        [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    return names + [f"model.layers.{i}.{p}.weight" for i in range(spec.num_layers) for p in per_layer]


def _layer_weight(spec: ModelSpec, name: str, hf) -> np.ndarray:
    """One layer's slice of our stacked weight `name`, from `hf(name inside model.layers.{i})`."""
    if name == "attn_norm":
        return hf("input_layernorm.weight")
    if name == "mlp_norm":
        return hf("post_attention_layernorm.weight")
    if name == "wqkv":
        hkv, dh = spec.num_kv_heads, spec.head_dim
        q = hf("self_attn.q_proj.weight").T.reshape(-1, hkv, spec.num_heads // hkv, dh)
        k = hf("self_attn.k_proj.weight").T.reshape(-1, hkv, 1, dh)
        v = hf("self_attn.v_proj.weight").T.reshape(-1, hkv, 1, dh)
        return np.concatenate([q, k, v], axis=2)
    if name == "wo":
        return hf("self_attn.o_proj.weight").T
    if name == "w_gate_up":
        return np.stack([hf("mlp.gate_proj.weight").T, hf("mlp.up_proj.weight").T], axis=1)
    if name == "w_down":
        return hf("mlp.down_proj.weight").T
    raise KeyError(name)
