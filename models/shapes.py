"""Named shapes of real models, as `ModelSpec` values: benchmarks run random weights of these sizes
(`scripts/bench_engine.py --shape NAME`) where the real weights are not at hand. Sizes, RoPE and
special token ids are the real models' configs; `tiny` is for quick CPU runs."""
from __future__ import annotations

from models.spec import ModelSpec, RopeScaling

SHAPES: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=64, rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
    # SmolLM2-135M(-Instruct): the packaged default model's shape.
    "smollm2-135m": ModelSpec(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,)),
    # SmolLM2-1.7B(-Instruct): the model of the measured H200 profile.
    "smollm2-1.7b": ModelSpec(
        vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32, num_kv_heads=32,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,)),
    # Llama-3.1-8B: an 8B-class model with grouped-query attention (4 query heads per KV head).
    "llama3-8b": ModelSpec(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,)),
}


def shape_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a shape name."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return SHAPES[name]
