"""The devices an engine runs on: the tensor-parallel mesh, the splits of the KV pools, and the
processes of a multi-host run.

The step is one `jax.jit` with explicit in and out shardings, and GSPMD partitions it: the
weights carry Megatron splits (`models.llama.PARAM_SPECS`) and the pools are split over KV heads,
so XLA inserts the two all-reduces per layer that Megatron needs (after o and after down) and an
all-gather of the vocabulary-split logits before sampling, and nothing else. We chose GSPMD over
`shard_map` because the model code stays the one code path for one device and for many, with no
per-shard shapes or hand-placed collectives to keep in step with it; `tests/test_tensor_parallel.py`
checks the compiled step's collectives so a change that makes XLA gather a pool or a weight fails.

A multi-host run has one process per host (`initialize_distributed`), and the mesh spans the
devices of all of them. Only process 0 runs the engine: its clock, its tool threads and its HTTP
server decide what each step does, and no other process could repeat those decisions. It sends
each step's runner inputs to the others through the key-value store of JAX's distributed runtime
(`StepChannel`), and they make the same device calls in the same order (`ModelRunner.follow`),
so every collective of the step has all its devices.
"""
from __future__ import annotations

import io
import itertools
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.llama import KV_POOL_SPEC, TP
from models.spec import ModelSpec



def tp_mesh(tensor_parallel_size: int) -> Mesh:
    """A one-axis mesh (`tp`) over the first `tensor_parallel_size` devices of the run."""
    devices = jax.devices()
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} devices; "
                         f"this run has {len(devices)} ({devices[0].platform})")
    devices = devices[:tensor_parallel_size]
    if {d.process_index for d in devices} != set(range(jax.process_count())):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} leaves some of the run's "
                         f"{jax.process_count()} processes without a device; every process must hold part "
                         f"of the model (use all {jax.device_count()} devices)")
    return jax.make_mesh((tensor_parallel_size,), (TP,), axis_types=(AxisType.Auto,), devices=devices)


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


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-host run (one process per host) when a coordinator is given, here or in
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; returns whether it did.

    JAX reads only the address from the environment, so the count and the id are read here. It
    must run before anything touches a device: the devices of every process then make up
    `jax.devices()`, and `tp_mesh` splits the model over all of them. Every process calls
    `jax.distributed.shutdown()` once its work is done (the CLI does): it waits for all of them,
    so process 0, which hosts the coordinator, exits last.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if address is None:
        if num_processes is not None or process_id is not None:
            raise ValueError("a number of processes or a process id was given without a coordinator address: "
                             "give --coordinator-address (or JAX_COORDINATOR_ADDRESS) too")
        return False
    if num_processes is None or process_id is None:
        raise ValueError(f"a multi-host run with the coordinator {address} also needs the number of processes "
                         "and this process's id: give --num-processes and --process-id "
                         "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"the coordinator address must be host:port, got {address!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"the process id must be in [0, {num_processes}) for {num_processes} processes, "
                         f"got {process_id}")
    jax.distributed.initialize(address, num_processes, process_id)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


class StepChannel:
    """Process 0's step messages to the other processes of a multi-host run, in order.

    A message is named numpy arrays (an npz, no pickle), stored under a key of its own in the
    distributed runtime's key-value store; None tells the others to stop. Process 0 deletes the
    messages it sent once a step that needed every process has finished (`forget_read`).
    """

    POLL_MS = 60_000    # a receiver waits this long per try, then tries again (an idle server)
    _made = itertools.count()

    def __init__(self):
        from jax._src.distributed import global_state   # the client JAX itself shares compiled code with

        if global_state.client is None:
            raise RuntimeError("the JAX distributed runtime is not initialized (see initialize_distributed)")
        self.client = global_state.client
        # Every process makes its engines, and so their channels, in the same order.
        self.prefix = f"infercept/channel-{next(StepChannel._made)}/"
        self.is_sender = jax.process_index() == 0
        self.count = 0          # messages sent or received so far
        self.unread: list[str] = []   # sender: keys another process may not have read yet

    def send(self, arrays: dict[str, np.ndarray] | None) -> None:
        buffer = io.BytesIO()
        if arrays is not None:
            np.savez(buffer, **arrays)
        key = self._next_key()
        self.client.key_value_set_bytes(key, buffer.getvalue())
        self.unread.append(key)

    def receive(self) -> dict[str, np.ndarray] | None:
        key = self._next_key()
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(key, self.POLL_MS)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        if not data:
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}

    def forget_read(self) -> None:
        """Delete the messages sent so far: call it once every process has acted on all of them."""
        for key in self.unread:
            self.client.key_value_delete(key)
        self.unread.clear()

    def _next_key(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"
