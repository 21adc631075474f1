"""Loading straight into a mesh's splits, on CPU devices (a process started by
tests/test_multidevice.py): from a lazily read safetensors folder and from an orbax checkpoint."""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from helpers import RecordedReads, assert_same_weights, random_hf_tensors, tiny_spec, write_hf_folder
from infercept_jax.parallel import tp_mesh
from models.checkpoint import restore_llama, save_weights
from models.llama import PARAM_SPECS, Llama
from models.weights import load_hf_folder

SPEC = tiny_spec(num_heads=8, num_kv_heads=4, head_dim=8)


def assert_split_by_param_specs(model: Llama, tp: int) -> None:
    """Every weight is split over the `tp` mesh as PARAM_SPECS says, each device holding 1/tp of a split axis."""
    for name, array in model.weights().items():
        spec = PARAM_SPECS[name]
        assert array.sharding.spec == spec and len(array.sharding.mesh.devices) == tp, name
        part = tuple(n // tp if axis else n for n, axis in zip(array.shape, tuple(spec) + (None,) * array.ndim))
        assert {shard.data.shape for shard in array.addressable_shards} == {part}, name


def test_a_bf16_folder_loads_into_two_devices_reading_each_tensor_once(tmp_path: Path):
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in random_hf_tensors(SPEC, seed=11).items()}
    spec, stored = load_hf_folder(write_hf_folder(tmp_path, SPEC, bf16))
    reads = RecordedReads(stored)
    model = Llama.from_hf_weights(spec, reads, dtype=jnp.bfloat16, mesh=tp_mesh(2))
    assert sorted(name for name, _ in reads.reads) == sorted(bf16)   # one read per tensor, not one per device
    assert_split_by_param_specs(model, 2)
    assert_same_weights(model, Llama.from_hf_weights(SPEC, bf16, dtype=jnp.bfloat16))


def test_a_checkpoint_restores_into_two_devices(tmp_path: Path):
    tensors = random_hf_tensors(SPEC, seed=12)
    save_weights(Llama.from_hf_weights(SPEC, tensors), tmp_path / "ckpt")
    model = restore_llama(SPEC, tmp_path / "ckpt", dtype=jnp.bfloat16, mesh=tp_mesh(2))
    assert_split_by_param_specs(model, 2)
    one = Llama.from_hf_weights(SPEC, tensors, dtype=jnp.bfloat16)
    assert_same_weights(model, one)
    wqkv = model.wqkv[...]   # device 1 holds KV heads 2 and 3 with their query heads
    second = next(s for s in wqkv.addressable_shards if s.index[2].start == 2)
    np.testing.assert_array_equal(np.asarray(second.data), np.asarray(one.wqkv[...])[:, :, 2:4])
