"""Shared test helpers: tiny random Llamas, a single-sequence paged forward, a compile counter,
engines around stand-in runners, and the skip for tests that need the packaged SmolLM2 weights."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infercept_jax.build import build_engine
from infercept_jax.config import EngineConfig
from infercept_jax.engine import Engine
from kvcache.block_manager import BlockManager
from kvcache.paged import AttentionInputs, RowGroup, allocate_pools
from models import registry
from models.llama import Llama
from models.spec import ModelSpec, RopeScaling
from scheduling.profile import HardwareProfile
from scheduling.scheduler import Scheduler, SchedulerConfig


def _smollm2_missing() -> str | None:
    """Why the SmolLM2-135M weights package cannot be used (the registry's own message), or None."""
    try:
        registry._smollm2_gguf()
    except ValueError as error:
        return str(error)
    return None


# Tests of the real model skip where its package is not installed (a GPU machine without a package
# registry); where it is, they run.
SMOLLM2_MISSING = _smollm2_missing()
requires_smollm2 = pytest.mark.skipif(SMOLLM2_MISSING is not None, reason=str(SMOLLM2_MISSING))


LLAMA3_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64)


def tiny_spec(tied: bool = False, scaling: RopeScaling | None = None, **kw) -> ModelSpec:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, rope_scaling=scaling,
                tie_word_embeddings=tied, max_position_embeddings=512, eos_token_ids=(1,))
    base.update(kw)
    return ModelSpec(**base)


def random_hf_tensors(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named random weights (norm weights away from 1 so the norms are exercised)."""
    rng = np.random.default_rng(seed)
    D, F = spec.hidden_size, spec.intermediate_size
    hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    w = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    norm = lambda: (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(spec.vocab_size, D), "model.norm.weight": norm()}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "post_attention_layernorm.weight"] = norm()
        t[p + "self_attn.q_proj.weight"] = w(hq, D)
        t[p + "self_attn.k_proj.weight"] = w(hkv, D)
        t[p + "self_attn.v_proj.weight"] = w(hkv, D)
        t[p + "self_attn.o_proj.weight"] = w(D, hq)
        t[p + "mlp.gate_proj.weight"] = w(F, D)
        t[p + "mlp.up_proj.weight"] = w(F, D)
        t[p + "mlp.down_proj.weight"] = w(D, F)
    if not spec.tie_word_embeddings:
        t["lm_head.weight"] = w(spec.vocab_size, D)
    return t


def write_hf_folder(folder: Path, spec: ModelSpec, tensors: dict[str, np.ndarray]) -> Path:
    """An HF checkpoint folder: config.json and one model.safetensors holding `tensors` in their own
    dtypes (bfloat16 too), written by hand as the format says: 8-byte header size, JSON header, data."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16",
             np.dtype(np.int8): "I8"}
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(spec.to_hf_config()))
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())
    return folder


class RecordedReads(Mapping[str, np.ndarray]):
    """A tensor mapping that records the name and dtype of every tensor it hands out."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors, self.reads = tensors, []

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        self.reads.append((name, tensor.dtype))
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def assert_same_weights(model: Llama, want: Llama) -> None:
    """Every weight of `model` has the dtype and values of `want`'s."""
    got, expected = model.weights(), want.weights()
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        assert got[name].dtype == w.dtype, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(w), err_msg=name)


def paged_logits(model: Llama, token_ids: list[int], block_size: int = 4, row_width: int | None = None,
                 chunk_pages: int = 2, pool_sharding=None, attention: str = "xla") -> np.ndarray:
    """Logits [n, V] of one sequence prefilled in one pass through the paged path.

    Blocks are handed out in a scrambled order so that paging is exercised. A model split over a
    mesh needs its pools split over the same mesh (`pool_sharding`). `attention` is the kernel.
    """
    n = len(token_ids)
    q = row_width or n
    num_blocks = -(-n // block_size)
    table = np.random.default_rng(1).permutation(num_blocks).astype(np.int32) + 1
    width = -(-num_blocks // chunk_pages) * chunk_pages
    rows = -(-n // q)
    pos = np.arange(n, dtype=np.int32)
    slot = table[pos // block_size] * block_size + pos % block_size
    rti = np.full((rows, q), n, np.int32)
    rpos = np.full((rows, q), -1, np.int32)
    rti.reshape(-1)[:n] = pos
    rpos.reshape(-1)[:n] = pos
    tables = np.zeros((rows, width), np.int32)
    tables[:, :num_blocks] = table
    group = RowGroup(rti, rpos, tables, np.int32(-(-n // (chunk_pages * block_size))))
    meta = AttentionInputs(slot, pos.copy(), (group,))
    spec = model.spec
    k_pool, v_pool = allocate_pools(spec.num_layers, num_blocks + 1, block_size, spec.num_kv_heads,
                                    spec.head_dim, model.dtype, sharding=pool_sharding)
    mesh = None if pool_sharding is None else pool_sharding.mesh
    hidden, _, _ = model(jnp.asarray(token_ids, jnp.int32), jnp.asarray(pos), k_pool, v_pool, meta, chunk_pages,
                         attention, mesh)
    return np.asarray(model.logits(hidden))


def torch_llama(spec: ModelSpec, tensors: dict[str, np.ndarray]):
    """transformers' LlamaForCausalLM (fp32, eager attention) with the same weights."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in spec.to_hf_config().items()
                                      if k not in ("architectures", "model_type", "torch_dtype")})
    cfg._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    if spec.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    ref.load_state_dict(state, strict=True)
    return ref


def paused_run(llm, prompts: list[list[int]], params) -> list[list[int]]:
    """Generate for `prompts` on `llm`'s engine, each pausing as `params` says (intercept_after);
    a paused request is resumed with three result tokens two steps later, so a swapping policy
    swaps it out and back in."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    waiting, done = {}, {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
            elif out.paused:
                waiting[out.request_id] = 2
        for rid in list(waiting):
            waiting[rid] -= 1
            if not waiting[rid]:
                engine.resume(rid, [3, 4, 5])
                del waiting[rid]
    return [done[rid] for rid in ids]


@contextlib.contextmanager
def count_compiles():
    """Yield a list that collects the JAX compile events of the block (the no-compile guards)."""
    compiles = []

    def listener(event, *args, **kwargs):
        if "compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class FakeRunner:
    """Stands in for the model in scheduler tests: samples token 3 + (length % 40) for every
    request that finishes its in-flight tokens, in no time."""

    def execute(self, output):
        sampled = [(s.request, 3 + s.request.num_tokens % 40) for s in output.scheduled if s.samples]
        return sampled, 0.0


def write_bos_tokenizer(folder: Path) -> Path:
    """An HF tokenizer folder whose tokenizer adds BOS `<s>` (id 0) to every encoding, as a Llama's
    does: one word per token, ids 0-3 `<s>`, `</s>`, `hi`, `there`."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2, "there": 3}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def engine_with(runner, policy: str = "preserve", *, num_kv_blocks: int, block_size: int = 4, max_model_len: int = 64,
                vocab_size: int = 64, eos_token_ids=(1,), tokenizer=None, clock=lambda: 0.0, **options) -> Engine:
    """An engine around a stand-in runner, built as `LLM` builds one; `options` are EngineConfig fields."""
    config = EngineConfig.from_kwargs(policy=policy, num_kv_blocks=num_kv_blocks, block_size=block_size,
                                      max_model_len=max_model_len, warmup=False, compile_cache=False, **options)
    return build_engine(config, lambda *_: runner, kv_bytes_per_token=64, vocab_size=vocab_size,
                        model_max_len=max_model_len, eos_token_ids=eos_token_ids, tokenizer=tokenizer, clock=clock)


# T_fwd(x) = (x + 10) ms, S = 12: a saturated step takes 22 ms. N(S) = 24 tokens per step, so one
# token one way takes 22/24 ms. The hand-computed values of the scheduling tests use it.
HAND_PROFILE = HardwareProfile(name="hand", fwd_ms_per_token=1.0, fwd_base_ms=10.0, saturation_tokens=12,
                               swap_limit_tokens=24.0, kv_bytes_per_token=64, block_size=4)


def scheduler_with(policy, device_blocks: int = 64, host_blocks: int = 16, budget: int = 12,
                   max_seqs: int = 8) -> Scheduler:
    """A scheduler around `policy` on pools of 4-token blocks, without an engine."""
    return Scheduler(SchedulerConfig(budget, max_seqs), BlockManager(device_blocks, 4, host_blocks), policy)
