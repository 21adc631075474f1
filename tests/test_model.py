"""models/llama.py against transformers' LlamaForCausalLM, and the paged path against dense attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import LLAMA3_SCALING, paged_logits, random_hf_tensors, requires_smollm2, tiny_spec, torch_llama
from models.llama import Llama, apply_rope, rms_norm, swiglu
from models.spec import ModelSpec


@pytest.mark.parametrize("tied, scaling", [(False, None), (True, None), (False, LLAMA3_SCALING)],
                         ids=["untied", "tied", "llama3-rope"])
def test_logits_match_transformers(tied, scaling):
    torch = pytest.importorskip("torch")
    spec = tiny_spec(tied, scaling, max_position_embeddings=512)
    tensors = random_hf_tensors(spec, seed=1)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, 150).tolist()  # past the llama3 original 64
    ours = paged_logits(Llama.from_hf_weights(spec, tensors), ids)
    with torch.no_grad():  # float64 reference: the comparison then measures our float32 error alone
        ref = torch_llama(spec, tensors).double()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def dense_logits(model: Llama, ids: list[int]) -> np.ndarray:
    """The same weights through plain causal attention over a contiguous sequence."""
    spec = model.spec
    n = len(ids)
    h = model.embed[...][jnp.asarray(ids)]
    pos = jnp.arange(n, dtype=jnp.float32)[:, None] * model.inv_freq[...][None]
    emb = jnp.concatenate([pos, pos], -1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    causal = jnp.tril(jnp.ones((n, n), bool))
    group = spec.num_heads // spec.num_kv_heads
    for i in range(spec.num_layers):
        x = rms_norm(h, model.attn_norm[...][i], spec.rms_norm_eps)
        q, k, v = model.project_qkv(x, model.wqkv[...][i])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
        s = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(spec.head_dim)
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        h = h + jnp.einsum("hqk,khd->qhd", p, v).reshape(n, -1) @ model.wo[...][i]
        x = rms_norm(h, model.mlp_norm[...][i], spec.rms_norm_eps)
        h = h + swiglu(x, model.w_gate_up[...][i]) @ model.w_down[...][i]
    return np.asarray(model.logits(rms_norm(h, model.final_norm[...], spec.rms_norm_eps)))


@pytest.mark.parametrize("block_size, row_width, chunk_pages", [(4, None, 2), (4, 5, 1), (8, 16, 3), (16, 1, 1)])
def test_paged_attention_equals_dense(block_size, row_width, chunk_pages):
    spec = tiny_spec()
    model = Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=2))
    ids = np.random.default_rng(5).integers(0, spec.vocab_size, 53).tolist()
    paged = paged_logits(model, ids, block_size=block_size, row_width=row_width, chunk_pages=chunk_pages)
    np.testing.assert_allclose(paged, dense_logits(model, ids), rtol=1e-5, atol=1e-5)


CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers."}],
]


@pytest.mark.slow
@requires_smollm2
def test_greedy_generation_matches_transformers_on_smollm2():
    torch = pytest.importorskip("torch")
    import transformers

    from infercept_jax import LLM, SamplingParams
    from models.registry import hf_reference_folder

    llm = LLM("smollm2-135m", max_num_seqs=8, max_num_batched_tokens=128, kv_cache_memory_gb=0.25,
              max_model_len=1024)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    prompts = [llm.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in CHAT_PROMPTS]
    prompts.append("def fibonacci(n):")
    ours = llm.generate(prompts, params)

    ref = transformers.LlamaForCausalLM.from_pretrained(hf_reference_folder("smollm2-135m"), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, ours):
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        with torch.no_grad():
            gen = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                               eos_token_id=llm.tokenizer.eos_token_id, pad_token_id=llm.tokenizer.eos_token_id)
        expected = gen[0, ids.shape[1]:].tolist()
        assert out.token_ids == expected, (prompt, out.text)
    assert "Paris" in ours[0].text


def test_bfloat16_model_stays_close_to_float32():
    spec = tiny_spec()
    tensors = random_hf_tensors(spec, seed=4)
    ids = np.random.default_rng(6).integers(0, spec.vocab_size, 40).tolist()
    f32 = paged_logits(Llama.from_hf_weights(spec, tensors), ids)
    bf16_model = Llama.from_hf_weights(spec, tensors, dtype=jnp.bfloat16)
    assert bf16_model.wqkv[...].dtype == jnp.bfloat16
    bf16 = paged_logits(bf16_model, ids)
    assert np.abs(bf16 - f32).max() <= 0.05 * np.abs(f32).max()
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name, params", [("smollm2-135m", 134_515_008), ("smollm2-1.7b", 1_711_376_384),
                                          ("llama3-8b", 8_030_261_248)])
def test_named_shapes_have_the_real_models_parameter_counts(name, params):
    from flax import nnx

    from models.shapes import SHAPES

    spec = SHAPES[name]
    model = Llama.abstract(spec)           # shapes only: nothing is allocated
    assert sum(w.size for w in jax.tree.leaves(nnx.state(model, nnx.Param))) == params
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


@requires_smollm2
def test_the_smollm2_135m_shape_is_the_packaged_models():
    from models.registry import load_spec
    from models.shapes import SHAPES

    assert load_spec("smollm2-135m") == SHAPES["smollm2-135m"]


def test_spec_reads_a_sparse_config_as_transformers_does():
    """Fields a config.json leaves out, or sets to null, take LlamaConfig's defaults (its
    rms_norm_eps is 1e-6, not 1e-5; null num_key_value_heads means one per query head)."""
    from transformers import LlamaConfig

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": None}
    spec, ref = ModelSpec.from_hf_config(cfg), LlamaConfig(**cfg)
    assert (spec.rms_norm_eps, spec.num_kv_heads, spec.max_position_embeddings, spec.tie_word_embeddings) == \
        (ref.rms_norm_eps, ref.num_key_value_heads, ref.max_position_embeddings, ref.tie_word_embeddings)
