"""The devices an engine runs on: the tensor-parallel mesh and the splits of the KV pools.

The step is one `jax.jit` with explicit in and out shardings, and GSPMD partitions it: the
weights carry Megatron splits (`models.llama.PARAM_SPECS`) and the pools are split over KV heads,
so XLA inserts the two all-reduces per layer that Megatron needs (after o and after down) and an
all-gather of the vocabulary-split logits before sampling, and nothing else. We chose GSPMD over
`shard_map` because the model code stays the one code path for one device and for many, with no
per-shard shapes or hand-placed collectives to keep in step with it; `tests/test_tensor_parallel.py`
checks the compiled step's collectives so a change that makes XLA gather a pool or a weight fails.
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.llama import TP
from models.spec import ModelSpec

KV_POOL_SPEC = P(None, None, None, TP, None)   # [layers, blocks, block_size, KV heads, head_dim]


def tp_mesh(tensor_parallel_size: int) -> Mesh:
    """A one-axis mesh (`tp`) over the first `tensor_parallel_size` devices of the run."""
    devices = jax.devices()
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} devices; "
                         f"this run has {len(devices)} ({devices[0].platform})")
    return jax.make_mesh((tensor_parallel_size,), (TP,), axis_types=(AxisType.Auto,),
                         devices=devices[:tensor_parallel_size])


def check_tensor_parallel(spec: ModelSpec, tensor_parallel_size: int) -> None:
    """Refuse a model that does not split evenly: every device gets whole KV heads (with their
    query heads), whole MLP units and an equal part of the vocabulary."""
    n = tensor_parallel_size
    for what, count in (("KV heads", spec.num_kv_heads), ("MLP units (intermediate_size)", spec.intermediate_size),
                        ("vocabulary entries", spec.vocab_size)):
        if count % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide the model's {count} {what}; "
                             f"use a size that divides {count}")


def kv_pool_sharding(mesh: Mesh) -> NamedSharding:
    """The KV pools' split: by KV heads, like the k/v columns of `wqkv` that write them."""
    return NamedSharding(mesh, KV_POOL_SPEC)


def tensor_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[TP]
