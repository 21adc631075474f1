"""Peak host memory of loading a 1.7B-class bfloat16 checkpoint into a bfloat16 model on CPU.

Writes a checkpoint of SmolLM2-1.7B's shapes with random weights once (a safetensors folder of
3.4 GB, generated in chunks so the writer never holds it), then loads it in a fresh process per
variant and reports the peak resident memory (VmHWM) above the process's baseline (its resident
memory once JAX and the loader are imported), as a ratio to the checkpoint's size. On the CPU
backend device memory is host memory, so the loaded model itself counts: 1.0x is the floor.

Variants:
  safetensors  `load_hf_folder` + `Llama.from_hf_weights(dtype=bfloat16)`: how `LLM` loads an HF folder
  orbax        `restore_llama` of an orbax checkpoint of the same weights: how `LLM` loads a converted GGUF
  baseline     the safetensors variant with the `models` of another checkout (--baseline-tree), e.g.
               the commit before the lazy loader: `git archive 4a39b2d models kvcache | tar -x -C /tmp/old`

    python scripts/bench_loader.py [--dir /tmp/bench_loader] [--baseline-tree /tmp/old] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from models.spec import ModelSpec

# SmolLM2-1.7B: 24 layers of hidden 2048, 32 heads (no GQA) of 64, MLP 8192, vocabulary 49152, tied head.
SPEC = ModelSpec(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32,
                 num_kv_heads=32, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192)
REPO = Path(__file__).resolve().parent.parent
CHUNK = 1 << 24   # values generated at a time by the writer


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    D, F, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (hq, D), p + "self_attn.k_proj.weight": (hkv, D),
                   p + "self_attn.v_proj.weight": (hkv, D), p + "self_attn.o_proj.weight": (D, hq),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)}
    return shapes


def write_checkpoint(folder: Path) -> int:
    """config.json and a bf16 model.safetensors of random values; its data size in bytes."""
    shapes = hf_shapes(SPEC)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if (folder / "model.safetensors").is_file():
        return offset
    need = 2.2 * offset   # the safetensors file and the orbax checkpoint, with some room
    disk = next(p for p in folder.parents if p.exists())
    free = shutil.disk_usage(disk).free
    if free < need:
        sys.exit(f"{disk} has {free / 1e9:.1f} GB free; this benchmark needs {need / 1e9:.1f} GB")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SPEC.to_hf_config()))
    raw = json.dumps(header).encode()
    rng = np.random.default_rng(0)
    with open(folder / "model.safetensors.tmp", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            left = math.prod(shape)
            while left:
                n = min(left, CHUNK)
                f.write((rng.standard_normal(n, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes())
                left -= n
    (folder / "model.safetensors.tmp").rename(folder / "model.safetensors")
    return offset


def memory_kb(field: str) -> int:
    """A field of /proc/self/status in kB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(variant: str, folder: Path) -> None:
    """Load the checkpoint once as `variant` says, and print the baseline and peak memory as JSON."""
    import jax
    import jax.numpy as jnp

    from models.llama import Llama
    from models.weights import load_hf_folder

    def from_safetensors() -> Llama:
        return Llama.from_hf_weights(*load_hf_folder(folder), dtype=jnp.bfloat16)

    load = from_safetensors
    if variant != "safetensors":   # a baseline tree may have no models.checkpoint
        from models.checkpoint import restore_llama, save_weights

        if variant == "save-orbax":
            save_weights(from_safetensors(), folder / "orbax")
            return
        load = lambda: restore_llama(SPEC, folder / "orbax", dtype=jnp.bfloat16)  # noqa: E731
    jax.devices()
    baseline = memory_kb("VmRSS")
    model = load()
    jax.block_until_ready([getattr(model, name)[...] for name in ("embed", "wqkv", "w_gate_up", "w_down")])
    print(json.dumps({"baseline_kb": baseline, "peak_kb": memory_kb("VmHWM")}))


def measure(variant: str, root: Path, models_tree: Path) -> dict:
    """Run `child(variant)` in a fresh process whose `models` come from `models_tree`."""
    env = dict(os.environ, PYTHONPATH=str(models_tree), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, __file__, "--child", variant, "--dir", str(root)], env=env,
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"{variant} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1]) if variant != "save-orbax" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_loader"), help="where the checkpoint goes")
    parser.add_argument("--baseline-tree", type=Path, help="a checkout whose loader is the baseline")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir / "smollm2-1.7b-shapes-bf16"
    if args.child:
        child(args.child, folder)
        return
    size = write_checkpoint(folder)
    if not (folder / "orbax").is_dir():
        measure("save-orbax", args.dir, REPO)
    runs = [("safetensors", REPO), ("orbax", REPO)]
    if args.baseline_tree:
        runs.insert(0, ("baseline", args.baseline_tree))
    print(f"checkpoint: {size / 1e9:.2f} GB of bf16 (SmolLM2-1.7B shapes), loaded into a bf16 model on CPU")
    print(f"{'variant':<12} {'peak above baseline':>20} {'x checkpoint':>13}")
    results = {}
    for name, tree in runs:
        m = measure("safetensors" if name == "baseline" else name, args.dir, tree)
        results[name] = (m["peak_kb"] - m["baseline_kb"]) * 1024
        print(f"{name:<12} {results[name] / 1e9:>17.2f} GB {results[name] / size:>12.2f}x", flush=True)
    if "baseline" in results:
        print(f"safetensors peak / baseline peak: {results['safetensors'] / results['baseline']:.2f}")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
