"""Weight loading, GGUF conversion, tokenizer and registry, checked against transformers' own loaders."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from helpers import (SMOLLM2_MISSING, RecordedReads, assert_same_weights, paged_logits, random_hf_tensors, tiny_spec,
                     write_bos_tokenizer, write_hf_folder)
from infercept_jax.serving.chat import ChatFormat
from models import checkpoint, registry
from models.llama import Llama
from models.registry import hf_reference_folder, load_model, resolve_model
from models.tokenizer import Tokenizer, tokenizer_from_gguf
from models.weights import load_gguf, load_hf_folder, unpermute_rope_rows

CHAT = [{"role": "user", "content": "What is 2+2?"}]
TEXTS = [
    "Hello world!",
    "  leading spaces,\ttabs\n\nand newlines ",
    "héllo wörld — 日本語 🤗",
    "def f(x):\n    return x**2 + 12345  # 3.14\n",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|><repo_name>a5b 2024-01-02",
]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k `permute` (HF -> GGUF), the direction `unpermute_rope_rows` undoes."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- HF folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_hf_folder_matches_state_dict(tmp_path: Path, tied: bool, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=256, rope_theta=5000.0, eos_token_id=3, bos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path, safe_serialization=True)

    spec, tensors = load_hf_folder(tmp_path)
    expected = {k: v.float().numpy() for k, v in model.state_dict().items()}
    if tied:
        del expected["lm_head.weight"]
    assert set(tensors) == expected.keys() and len(tensors) == len(expected)
    for name, want in expected.items():
        assert tensors[name].dtype == np.dtype(getattr(jnp, dtype)), name  # as stored: never widened
        np.testing.assert_array_equal(tensors[name].astype(np.float32), want, err_msg=name)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_layers) == (4, 2, 16, 2)
    assert spec.tie_word_embeddings is tied and spec.rope_theta == 5000.0 and spec.eos_token_ids == (3,)


def test_hf_folder_rejects_other_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                      "model_type": "mistral"}))
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        load_hf_folder(tmp_path)


@pytest.mark.parametrize("option", [{"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}])
def test_hf_folder_rejects_llama_options_it_does_not_implement(tmp_path: Path, option: dict) -> None:
    """Biases would be left out of the model and another activation replaced by silu: refused instead."""
    spec = tiny_spec()
    folder = write_hf_folder(tmp_path, spec, random_hf_tensors(spec))
    (folder / "config.json").write_text(json.dumps(spec.to_hf_config() | option))
    key, value = next(iter(option.items()))
    with pytest.raises(ValueError, match=f"unsupported Llama config {key}={value!r}"):
        load_hf_folder(folder)


def test_hf_folder_eos_ids_include_generation_config(tmp_path: Path) -> None:
    """Meta-Llama-3-8B-Instruct's config.json names <|end_of_text|> (128001) and its
    generation_config.json adds the end of a turn, <|eot_id|> (128009): a reply stops at either."""
    spec = tiny_spec(eos_token_ids=(1,))
    folder = write_hf_folder(tmp_path, spec, random_hf_tensors(spec))
    assert load_hf_folder(folder)[0].eos_token_ids == (1,)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 9]}))
    assert load_hf_folder(folder)[0].eos_token_ids == (1, 9)
    assert registry.load_spec(str(folder)).eos_token_ids == (1, 9)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_hf_folder(folder)[0].eos_token_ids == (1, 7)


def test_bf16_folder_loads_into_bf16_model_without_widening(tmp_path: Path) -> None:
    spec = tiny_spec()
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in random_hf_tensors(spec, seed=7).items()}
    loaded_spec, stored = load_hf_folder(write_hf_folder(tmp_path, spec, bf16))
    assert loaded_spec == spec
    reads = RecordedReads(stored)
    model = Llama.from_hf_weights(spec, reads, dtype=jnp.bfloat16)
    assert sorted(name for name, _ in reads.reads) == sorted(bf16)      # each tensor read once, when needed
    assert {dtype for _, dtype in reads.reads} == {np.dtype(jnp.bfloat16)}  # as stored: no float32 copy
    # The old loader widened every tensor to float32 first; the model must not change.
    widened = Llama.from_hf_weights(spec, {k: v.astype(np.float32) for k, v in bf16.items()}, dtype=jnp.bfloat16)
    assert_same_weights(model, widened)
    ids = list(range(3, 40))
    np.testing.assert_array_equal(paged_logits(model, ids), paged_logits(widened, ids))


def test_f32_folder_loads_into_bf16_model(tmp_path: Path) -> None:
    spec = tiny_spec()
    tensors = random_hf_tensors(spec, seed=8)
    model = Llama.from_hf_weights(*load_hf_folder(write_hf_folder(tmp_path, spec, tensors)), dtype=jnp.bfloat16)
    assert {name for name, w in model.weights().items() if w.dtype != jnp.bfloat16} == {"inv_freq"}
    bf16 = lambda name: tensors[name].astype(jnp.bfloat16)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(model.embed[...]), bf16("model.embed_tokens.weight"))
    np.testing.assert_array_equal(np.asarray(model.wo[...][1]), bf16("model.layers.1.self_attn.o_proj.weight").T)
    up = bf16("model.layers.0.mlp.up_proj.weight")
    np.testing.assert_array_equal(np.asarray(model.w_gate_up[...][0, :, 1]), up.T)
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), bf16("lm_head.weight").T)


def test_bad_hf_folders_give_clear_errors(tmp_path: Path) -> None:
    spec = tiny_spec()
    tensors = random_hf_tensors(spec)
    folder = write_hf_folder(tmp_path / "truncated", spec, tensors)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="'lm_head.weight'.*truncated or corrupt"):
        load_hf_folder(folder)

    (folder / "model.safetensors").write_bytes(b"\x10" + bytes(100))
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file"):
        load_hf_folder(folder)

    folder = write_hf_folder(tmp_path / "int8", spec, tensors | {"extra": np.zeros(3, np.int8)})
    with pytest.raises(ValueError, match="'extra' has unsupported dtype I8"):
        load_hf_folder(folder)

    del tensors["model.layers.1.mlp.up_proj.weight"]
    spec_, stored = load_hf_folder(write_hf_folder(tmp_path / "missing", spec, tensors))
    with pytest.raises(ValueError, match="missing 'model.layers.1.mlp.up_proj.weight'"):
        Llama.from_hf_weights(spec_, stored)

    folder = write_hf_folder(tmp_path / "no-tokenizer", spec, random_hf_tensors(spec))
    (folder / "tokenizer.model").write_bytes(b"a sentencepiece model")
    with pytest.raises(ValueError, match=f"no tokenizer.json in {folder}"):
        load_model(str(folder))
    with pytest.raises(ValueError, match=f"no tokenizer.json in {folder}"):
        registry.load_tokenizer(str(folder))

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(spec.to_hf_config()))
    with pytest.raises(ValueError, match=r"no \*.safetensors files"):
        load_model(str(tmp_path / "empty"))


# --- GGUF --------------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    # Within a head of dim 8, GGUF interleaves the two rotate-half halves: rows 0,4,1,5,2,6,3,7.
    rows = np.arange(8, dtype=np.float32)[:, None]
    assert llama_cpp_permute(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight")
    if base in GGUF_GLOBAL:
        return GGUF_GLOBAL[base] + ".weight"
    _, _, layer, part = base.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER[part]}.weight"


def write_tiny_gguf(path: Path, tensors: dict[str, np.ndarray], heads: int, kv_heads: int,
                    edit: Callable[[gguf.GGUFWriter], None] = lambda writer: None) -> None:
    """A small llama GGUF laid out the way llama.cpp writes one: renamed, q/k permuted, byte-level
    vocab; `edit` adds to its metadata and tensors."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt"]
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(tensors["model.layers.0.mlp.up_proj.weight"].shape[0])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, t in tensors.items():
        if ".q_proj." in name:
            t = llama_cpp_permute(t, heads)
        elif ".k_proj." in name:
            t = llama_cpp_permute(t, kv_heads)
        w.add_tensor(gguf_name(name), t)
    edit(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny.gguf"
    return path, make_tiny_gguf(path)


def make_tiny_gguf(path: Path, seed: int = 1,
                   edit: Callable[[gguf.GGUFWriter], None] = lambda writer: None) -> dict[str, np.ndarray]:
    """Write a 2-layer GGUF of random weights drawn from `seed` (its size does not depend on it); its HF tensors."""
    rng = np.random.default_rng(seed)
    vocab, hidden, ffn, heads, kv_heads, head_dim = 260, 32, 48, 4, 2, 8
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                   p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                   p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    write_tiny_gguf(path, tensors, heads, kv_heads, edit)
    return tensors


def test_tiny_gguf_roundtrip(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, tensors = tiny_gguf
    spec, loaded = load_gguf(path)
    assert loaded.keys() == tensors.keys()
    for name, want in tensors.items():
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (4, 2, 8, 260)
    assert not spec.tie_word_embeddings and spec.rms_norm_eps == 1e-6
    assert (spec.bos_token_id, spec.eos_token_ids, spec.max_position_embeddings) == (1, (2,), 256)


def test_gguf_with_scaled_rope_is_refused(tmp_path: Path) -> None:
    """A linearly scaled GGUF (vicuna-7b-v1.5-16k's: factor 4) or a llama3 one (rope_freqs) is
    refused by name, not run with unscaled positions."""
    def linear(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    def legacy_linear(writer: gguf.GGUFWriter) -> None:
        writer.add_float32("llama.rope.scale_linear", 4.0)

    def llama3(writer: gguf.GGUFWriter) -> None:
        writer.add_tensor("rope_freqs.weight", np.ones(4, np.float32))

    for edit, message in ((linear, r"'linear' \(factor 4.0\)"), (legacy_linear, r"'linear' \(factor 4.0\)"),
                          (llama3, r"in .*llama3.gguf: .*rope_freqs")):
        path = tmp_path / f"{edit.__name__}.gguf"
        make_tiny_gguf(path, edit=edit)
        with pytest.raises(ValueError, match="unsupported RoPE scaling " + message):
            load_gguf(path)

    def unscaled(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)

    make_tiny_gguf(tmp_path / "none.gguf", edit=unscaled)
    assert load_gguf(tmp_path / "none.gguf")[0].rope_scaling is None


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    if SMOLLM2_MISSING:
        pytest.skip(SMOLLM2_MISSING)
    return registry._smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_gguf: Path) -> tuple:
    return load_gguf(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_spec(smollm2_tensors: tuple) -> None:
    spec, tensors = smollm2_tensors
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.vocab_size) == (30, 576, 1536, 49152)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (9, 3, 64)
    assert (spec.rope_theta, spec.rms_norm_eps, spec.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert spec.tie_word_embeddings and "lm_head.weight" not in tensors
    assert (spec.bos_token_id, spec.eos_token_ids) == (1, (2,))
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_loader(smollm2_gguf: Path, smollm2_tensors: tuple) -> None:
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).state_dict()
    _, tensors = smollm2_tensors
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{part}.weight"
        for i in (0, 1, 17, 29)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm")
    ]
    for name in names:
        np.testing.assert_allclose(tensors[name], ref[name].float().numpy(), rtol=0, atol=1e-6, err_msg=name)


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_tokenizer_known_ids(smollm2_tokenizer: Tokenizer) -> None:
    tok = smollm2_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 49152)
    # <|im_start|>=1, "user"=4093, "\n"=198, "Hi"=26843, <|im_end|>=2.
    assert tok.encode("<|im_start|>user\nHi<|im_end|>\n") == [1, 4093, 198, 26843, 2, 198]
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits are split one by one
    prompt = tok.apply_chat_template(CHAT)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert not tok.apply_chat_template(CHAT, add_generation_prompt=False).endswith("assistant\n")
    for text in TEXTS + [prompt]:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.decode(tok.encode("<|im_start|>user\nHi<|im_end|>")) == "user\nHi"


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_gguf: Path, smollm2_tokenizer: Tokenizer) -> None:
    from transformers import AutoTokenizer

    try:
        ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    except Exception as e:  # the known-ids test above still pins the behaviour
        pytest.skip(f"transformers cannot build the GGUF tokenizer: {e!r}")
    prompt = smollm2_tokenizer.apply_chat_template(CHAT)
    assert prompt == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in TEXTS + [prompt]:
        assert smollm2_tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text


@pytest.mark.slow
def test_saved_tokenizer_loads_in_transformers(tmp_path: Path, smollm2_tokenizer: Tokenizer) -> None:
    from transformers import AutoTokenizer

    smollm2_tokenizer.save(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_folder(tmp_path)
    assert (ref.bos_token_id, ref.eos_token_id) == (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    prompt = smollm2_tokenizer.apply_chat_template(CHAT)
    assert ours.apply_chat_template(CHAT) == prompt
    assert ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == prompt
    for text in TEXTS + [prompt]:
        want = smollm2_tokenizer.encode(text)
        assert ours.encode(text) == want and ref.encode(text, add_special_tokens=False) == want, text


def test_a_prompt_gets_the_bos_its_tokenizer_adds_once_as_transformers_encodes_it(tmp_path: Path) -> None:
    """Prompts were encoded without special tokens, so a Llama folder's prompts had no BOS."""
    from transformers import AutoTokenizer

    folder = write_bos_tokenizer(tmp_path / "tok")
    ours, ref = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.encode_prompt("hi there") == ref("hi there").input_ids == [0, 2, 3]
    assert ours.encode_prompt("<s> hi") == [0, 2]          # a rendered chat template already has it
    assert ours.encode("hi there") == [2, 3]                # a tool result: no BOS mid-context


def test_special_tokens_named_only_in_special_tokens_map_json_are_read(tmp_path: Path) -> None:
    """Older repos name bos/eos there alone; without the BOS text a rendered chat template got a second BOS."""
    from transformers import AutoTokenizer

    folder = write_bos_tokenizer(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}))
    ours, ref = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token) == ("<s>", "</s>")
    assert ours.encode_prompt("<s> hi") == [0, 2]


def test_named_chat_templates_render_tools_with_their_tool_use_template(tmp_path: Path) -> None:
    """tokenizer_config.json may hold a list of named templates (Hermes-2-Pro-Llama-3-8B: `default`
    and `tool_use`); transformers renders a call with tools by `tool_use`, so the model renders tools."""
    from tokenizers import models as tokenizer_models

    vocab = tokenizer_models.WordLevel({"<unk>": 0}, unk_token="<unk>")
    tokenizers.Tokenizer(vocab).save(str(tmp_path / "tokenizer.json"))
    turns = "{% for m in messages %}{{ m.content }}{% endfor %}"
    templates = [{"name": "default", "template": turns}, {"name": "tool_use", "template": "{{ tools | tojson }}" + turns}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    tok = Tokenizer.from_folder(tmp_path)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert tok.supports_tools
    assert ChatFormat(tok).render([{"role": "user", "content": "hi"}], tools) == '[{"name": "f"}]hi'
    assert ChatFormat(tok).render([{"role": "user", "content": "hi"}], None) == "hi"


# --- registry ----------------------------------------------------------------------------------


def test_resolve_rejects_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCEPT_JAX_CACHE", str(tmp_path / "cache"))
    for bad in ("no-such-model", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(ValueError, match="smollm2-135m") as err:
            resolve_model(bad)
        assert bad in str(err.value)
    with pytest.raises(ValueError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_resolve_gguf_path_converts_once(tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path, tensors = tiny_gguf
    monkeypatch.setenv("INFERCEPT_JAX_CACHE", str(tmp_path / "cache"))
    folder = resolve_model(str(path))
    assert Path(folder) == tmp_path / "cache" / f"tiny-{registry._file_key(path)}-v{registry.CONVERTER_VERSION}"
    assert sorted(p.name for p in Path(folder).iterdir()) == [
        "config.json", "generation_config.json", "orbax", "tokenizer.json", "tokenizer_config.json"]
    spec = load_gguf(path)[0]
    model, tok = load_model(folder)
    assert model.spec == spec
    assert_same_weights(model, Llama.from_hf_weights(spec, tensors))  # the checkpoint holds float32 exactly
    bf16, _ = load_model(str(path), dtype=jnp.bfloat16)                 # cast as it is restored
    assert_same_weights(bf16, Llama.from_hf_weights(spec, tensors, dtype=jnp.bfloat16))
    assert tok.encode("<|im_start|> t") == [1, len(tensors["model.embed_tokens.weight"]) - 1]
    assert tok.eos_token_id == 2 and tok.apply_chat_template([{"role": "user", "content": "x"}]) == \
        "<|im_start|>x<|im_end|>"
    assert json.loads((Path(folder) / "generation_config.json").read_text())["eos_token_id"] == 2

    monkeypatch.setattr(registry, "load_gguf", lambda p: pytest.fail("converted twice"))
    assert resolve_model(str(path)) == folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(folder).name]  # no temp folders left


def test_gguf_files_of_one_name_and_size_convert_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checkpoints' GGUFs (run1/model.gguf, run2/model.gguf) have the same name and size but
    not the same weights: each path loads its own, and so does a file rewritten in place."""
    monkeypatch.setenv("INFERCEPT_JAX_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "run1" / "model.gguf", tmp_path / "run2" / "model.gguf"
    first.parent.mkdir(), second.parent.mkdir()
    first_tensors, second_tensors = make_tiny_gguf(first, seed=1), make_tiny_gguf(second, seed=2)
    assert first.stat().st_size == second.stat().st_size
    for path, tensors in ((first, first_tensors), (second, second_tensors)):
        model, _ = load_model(str(path))
        assert_same_weights(model, Llama.from_hf_weights(model.spec, tensors))
    rewritten = make_tiny_gguf(first, seed=3)
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))   # a later write, on a coarse clock too
    model, _ = load_model(str(first))
    assert_same_weights(model, Llama.from_hf_weights(model.spec, rewritten))


def test_hf_reference_folder_of_a_gguf(tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path, tensors = tiny_gguf
    monkeypatch.setenv("INFERCEPT_JAX_CACHE", str(tmp_path / "cache"))
    folder = hf_reference_folder(str(path))
    assert folder == resolve_model(str(path)) + "-hf"
    spec, stored = load_hf_folder(folder)
    assert spec == load_gguf(path)[0] and set(stored) == tensors.keys()
    for name, want in tensors.items():
        np.testing.assert_array_equal(stored[name], want, err_msg=name)
    assert Tokenizer.from_folder(folder).encode("<|im_start|> t") == [1, len(tensors["model.embed_tokens.weight"]) - 1]
    monkeypatch.setattr(registry, "load_gguf", lambda p: pytest.fail("written twice"))
    assert hf_reference_folder(str(path)) == folder
    assert hf_reference_folder(folder) == folder  # an HF folder is its own reference


def test_crashed_conversion_leaves_nothing(tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCEPT_JAX_CACHE", str(tmp_path / "cache"))

    def crash(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(checkpoint, "save_weights", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        resolve_model(str(tiny_gguf[0]))
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
def test_smollm2_conversion(smollm2_tensors: tuple, tmp_path_factory: pytest.TempPathFactory,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("INFERCEPT_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    folder = resolve_model("SmolLM2-135M-Instruct")
    assert resolve_model("smollm2-135m") == folder and Path(folder).name == registry.SMOLLM2_CACHE_NAME
    model, tok = load_model("smollm2-135m")
    gguf_spec, gguf_tensors = smollm2_tensors
    assert model.spec == gguf_spec
    assert_same_weights(model, Llama.from_hf_weights(gguf_spec, gguf_tensors))

    # The reference folder for transformers holds the same tensors.
    reference = LlamaForCausalLM.from_pretrained(hf_reference_folder("smollm2-135m")).eval()
    assert reference.config.tie_word_embeddings and reference.config.eos_token_id == 2
    hf = reference.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.5.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(hf[name].numpy(), gguf_tensors[name])
    np.testing.assert_array_equal(hf["lm_head.weight"].numpy(), gguf_tensors["model.embed_tokens.weight"])  # tied
    # Wrongly laid-out q/k would still run; a greedy answer that makes sense shows RoPE lines up.
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user",
                                                             "content": "What is the capital of France?"}]))])
    out = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:].tolist())
