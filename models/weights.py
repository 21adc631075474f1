"""Read Llama weights from an HF folder (safetensors) or a GGUF file as numpy arrays under HF names.

Both loaders return the same thing, `(ModelSpec, {hf_name: array})`, with HF shapes ([out, in] for
linear layers) and HF's rotate-half RoPE layout, so the model code only ever sees one convention.
Safetensors are read lazily, one tensor at a time in its stored dtype; GGUF tensors are dequantized
to float32 up front (GGUF models here are small).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from models.spec import ModelSpec, token_ids

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# safetensors dtype names -> numpy (little-endian, as the format stores them; bfloat16 from ml_dtypes).
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16}

# GGUF llama tensor names -> HF names: whole-model tensors, then the per-layer `blk.N.<part>.weight` parts.
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def load_hf_folder(path: str | Path) -> tuple[ModelSpec, "SafetensorsWeights"]:
    """Spec and lazily read tensors (HF names, stored dtypes) of a Llama folder: config.json + *.safetensors."""
    folder = Path(path)
    spec = load_hf_spec(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    return spec, SafetensorsWeights(files)


def load_hf_spec(folder: Path) -> ModelSpec:
    """The spec in a folder's config.json, refused unless it is a Llama, with the end-of-sequence ids
    of its generation_config.json too: that is where a chat model may list its end-of-turn token
    (Meta-Llama-3-8B-Instruct: config.json names <|end_of_text|>, generation_config.json adds <|eot_id|>)."""
    cfg = json.loads((folder / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(
            f"unsupported architecture {archs or cfg.get('model_type')!r} in {folder}: "
            f"only {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llama') is supported"
        )
    spec = ModelSpec.from_hf_config(cfg)
    generation = folder / "generation_config.json"
    if not generation.is_file():
        return spec
    eos = token_ids(json.loads(generation.read_text()).get("eos_token_id"))
    return dataclasses.replace(spec, eos_token_ids=tuple(dict.fromkeys(spec.eos_token_ids + eos)))


class SafetensorsWeights(Mapping[str, np.ndarray]):
    """The tensors of some safetensors files by name, each read from disk when asked for, in its stored dtype.

    So a checkpoint is never held whole on the host: the model is built from one tensor at a time,
    converted straight to its dtype. BF16 comes back as `ml_dtypes.bfloat16` (= jnp.bfloat16), never
    widened. The headers are parsed by hand (8-byte size, JSON, raw little-endian data) because
    safetensors' numpy backend refuses BF16; a tensor is read with a plain file read, not a memory
    map, so its pages leave the process once the caller drops it.
    """

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, np.dtype, tuple[int, ...], int]] = {}
        for path in files:
            header, data_start = _safetensors_header(path)
            file_size = path.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
                if name in self._where:
                    raise ValueError(f"{path}: tensor {name!r} is also in {self._where[name][0]}")
                dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
                start, end = info["data_offsets"]
                if end - start != math.prod(shape) * dtype.itemsize or data_start + end > file_size:
                    raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) does not fit "
                                     f"bytes {start}..{end} of a {file_size - data_start}-byte data section: "
                                     f"the file is truncated or corrupt")
                self._where[name] = (path, dtype, shape, data_start + start)

    def __getitem__(self, name: str) -> np.ndarray:
        path, dtype, shape, offset = self._where[name]
        with open(path, "rb") as f:
            f.seek(offset)
            return np.fromfile(f, dtype=dtype, count=math.prod(shape)).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header, and where its data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size) if size <= path.stat().st_size - 8 else b""
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: it does not start with a JSON header")
    return header, 8 + size


def load_gguf(path: str | Path) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Spec and dequantized float32 tensors of a llama GGUF, renamed, reshaped and un-permuted to HF's layout."""
    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {path}: only 'llama' is supported")
    _check_gguf_rope(reader, path)
    spec = _gguf_spec(reader)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        # GGUF lists dims innermost first (ne0 = in_features): reversed, they are numpy's [out, in].
        shape = tuple(int(d) for d in reversed(t.shape))
        # A copy: for F32 tensors dequantize returns a read-only view of the memory-mapped file.
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            arr = unpermute_rope_rows(arr, spec.num_heads)
        elif name.endswith("k_proj.weight"):
            arr = unpermute_rope_rows(arr, spec.num_kv_heads)
        tensors[name] = arr
    return spec, tensors


def _check_gguf_rope(reader: GGUFReader, path: str | Path) -> None:
    """Refuse scaled RoPE, which the spec read from a GGUF cannot carry: loaded as plain RoPE, the
    model would run with the wrong positions. A converted HF `rope_scaling` is `rope.scaling.type`
    (older files: `rope.scale_linear`); llama3 scaling is a `rope_freqs` tensor of factors."""
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    linear = _field(reader, "llama.rope.scale_linear", 1.0)
    if scaling != "none" or linear != 1.0:
        factor = _field(reader, "llama.rope.scaling.factor", linear)
        raise ValueError(f"unsupported RoPE scaling {scaling if scaling != 'none' else 'linear'!r} (factor {factor}) "
                         f"in {path}: GGUF files are loaded with unscaled RoPE only")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"unsupported RoPE scaling in {path}: it has llama3 RoPE frequency factors "
                         f"(rope_freqs.weight); load the model's HF folder instead")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half halves).

    convert_hf_to_gguf maps HF rows with `w.reshape(n, 2, d/2, in).swapaxes(1, 2)`: within each head,
    HF row `s*d/2 + j` becomes GGUF row `2j + s`. Reading GGUF rows as (n, d/2, 2) and swapping back
    restores the HF order.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[gguf_name]
    m = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _GGUF_LAYER:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"


_MISSING = object()


def _field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF file lacks metadata key {key!r}")
        return default
    return field.contents()


def _gguf_spec(reader: GGUFReader) -> ModelSpec:
    def get(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, key, default)

    hidden, heads = int(get("llama.embedding_length")), int(get("llama.attention.head_count"))
    vocab = get("llama.vocab_size", None)
    head_dim = get("llama.attention.key_length", None) or get("llama.rope.dimension_count", None)
    bos, eos = get("tokenizer.ggml.bos_token_id", None), get("tokenizer.ggml.eos_token_id", None)
    return ModelSpec(
        vocab_size=int(vocab) if vocab is not None else len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(get("llama.feed_forward_length")),
        num_layers=int(get("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(get("llama.attention.head_count_kv", heads)),
        head_dim=int(head_dim) if head_dim is not None else hidden // heads,
        rms_norm_eps=_f32(get("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        max_position_embeddings=int(get("llama.context_length")),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _f32(value: Any) -> float:
    """GGUF floats are float32; go through its shortest repr so 1e-5 stays 1e-5, not 9.99999974e-06."""
    return float(str(np.float32(value)))
