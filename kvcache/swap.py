"""The host side of swap: a host KV pool and the copies between it and the device pools.

Two pools behind one interface (`copy_out`, `land`, `copy_in`, `release`, `warmup`, `block_bytes`),
chosen by a probe at start (`make_host_pool`, logged):

* `PinnedHostPool`, where the backend has the `pinned_host` memory kind and is not the CPU (auto),
  so each direction is one DMA of gathered pages and nothing is staged through pageable memory.
  Swap-out gathers the victim pages on the device into a staging array and `device_put`s the whole
  array to pinned host memory: that pinned array *is* the storage of its host blocks (the pool
  keeps, per host block, its array and its row there). Swap-in groups the requested host blocks by
  array, `device_put`s each array to the device once and scatters its rows into the donated pools
  (rows not asked for go to the reserved block 0). Nothing blocks the host: on a GPU both are
  async dispatches (XLA:CPU runs the swap-out's gather and copy on the calling thread). An array
  lives while one of its blocks does: a host block lets go of it when a swap-out overwrites the
  block, or when the runner `release`s the host blocks freed since the last step
  (`SchedulerOutput.host_freed`; blocks freed between steps, by an abort, are let go of with the
  next step that runs). A swap-in moves whole arrays, so a request swapped in a few blocks per
  step sends its next array over the link each step: pieces are capped at
  `PINNED_PIECE_BYTES` per device, which bounds that waste.
* `NumpyHostPool`, the fallback (and `auto` on the CPU backend, whose device memory already is host
  memory, so a pinned copy is one more memcpy): one preallocated numpy array per local device.
  Swap-out gathers on the device and copies to host asynchronously; `land` writes into numpy after
  the step is dispatched. Swap-in gathers the pages in numpy and moves them with one `device_put`
  per device before the scatter.

No computation ever runs on host-resident arrays (XLA on GPU turns it into slow host compute or
fails). A copy of n blocks is made in power-of-two pieces (greedy: 13 = 8 + 4 + 1, none bigger
than `max_blocks_per_copy`), so no padding wastes host memory and nothing compiles after warm-up.
Under tensor parallelism the pools are split over KV heads (`sharding`); a pinned array keeps
that split, and the numpy pool holds one array per device, so every shard moves between its own
device and its own host memory.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

log = logging.getLogger(__name__)

PAD_BLOCK = 0
# A pinned piece's size cap: a swap-in moves its whole array even when it needs a few of its blocks,
# but every piece is a dispatch or two on the host. 64 MiB: 16 blocks of SmolLM2-1.7B in bf16, all 64
# of SmolLM2-135M (docs/swap.md; the balance is inferred, not measured on a GPU yet).
PINNED_PIECE_BYTES = 64 * 2**20


def copy_buckets(max_blocks: int) -> list[int]:
    """Block counts of one copy: 1, 2, 4, ... up to `max_blocks` (a power of two)."""
    out, b = [], 1
    while b <= max_blocks:
        out.append(b)
        b *= 2
    return out


def piece_sizes(n: int, buckets: list[int]) -> list[int]:
    """`n` as a sum of buckets, largest first: 13 -> [8, 4, 1] (with buckets up to 8 or more)."""
    sizes = []
    for size in reversed(buckets):
        while n >= size:
            sizes.append(size)
            n -= size
    return sizes


def pinned_piece_blocks(block_bytes: int, max_blocks: int) -> int:
    """Blocks of the largest pinned piece: the largest power of two up to `max_blocks` whose bytes
    (`block_bytes` a block on one device) stay within `PINNED_PIECE_BYTES`; at least 1."""
    blocks = 1
    while blocks * 2 <= max_blocks and blocks * 2 * block_bytes <= PINNED_PIECE_BYTES:
        blocks *= 2
    return blocks


def _gather(k_pool: jax.Array, v_pool: jax.Array, blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pages `blocks` of every layer, [layers, n, ...]. A loop of dynamic slices: XLA:CPU runs it
    about 1.5x faster than an indexed gather (4.3 against 2.9 GB/s for 64 SmolLM2 blocks)."""
    def body(i, out):
        k, v = out
        k = jax.lax.dynamic_update_slice_in_dim(k, jax.lax.dynamic_slice_in_dim(k_pool, blocks[i], 1, axis=1), i, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(v, jax.lax.dynamic_slice_in_dim(v_pool, blocks[i], 1, axis=1), i, axis=1)
        return k, v

    shape = (k_pool.shape[0], blocks.shape[0]) + k_pool.shape[2:]
    empty = jnp.zeros(shape, k_pool.dtype)
    return jax.lax.fori_loop(0, blocks.shape[0], body, (empty, empty))


def _scatter(k_pool: jax.Array, v_pool: jax.Array, blocks: jax.Array, k: jax.Array,
             v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write pages [layers, n, ...] into `blocks` of the donated pools, in place: a loop of dynamic
    update slices runs about 3x faster on XLA:CPU than an indexed scatter (8 against 2.2 GB/s)."""
    def body(i, pools):
        kp, vp = pools
        kp = jax.lax.dynamic_update_slice_in_dim(kp, jax.lax.dynamic_slice_in_dim(k, i, 1, axis=1), blocks[i], axis=1)
        vp = jax.lax.dynamic_update_slice_in_dim(vp, jax.lax.dynamic_slice_in_dim(v, i, 1, axis=1), blocks[i], axis=1)
        return kp, vp

    return jax.lax.fori_loop(0, blocks.shape[0], body, (k_pool, v_pool))


def make_host_pool(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype,
                   sharding: jax.sharding.Sharding | None = None, max_blocks_per_copy: int = 64,
                   transfer: str = "auto") -> HostKVPool:
    """The host pool for `transfer`: `pinned_host`, `numpy`, or `auto` (pinned where the backend has
    pinned host memory and is not the CPU; swap-out of 64 SmolLM2 blocks on CPU: 1.5 GB/s through
    pinned_host, 2.3-2.6 through numpy)."""
    sharding = sharding or SingleDeviceSharding(jax.local_devices()[0])
    device = min(sharding.addressable_devices, key=lambda d: d.id)
    kinds = {m.kind for m in device.addressable_memories()}
    if transfer == "auto":
        transfer = "pinned_host" if "pinned_host" in kinds and device.platform != "cpu" else "numpy"
    if transfer not in ("pinned_host", "numpy"):
        raise ValueError(f"transfer must be auto, pinned_host or numpy, got {transfer!r}")
    if transfer == "pinned_host" and "pinned_host" not in kinds:
        raise ValueError(f"the {device.platform} backend has no pinned_host memory")
    kind = PinnedHostPool if transfer == "pinned_host" else NumpyHostPool
    pool = kind((num_layers, num_blocks, block_size, num_kv_heads, head_dim), jnp.dtype(dtype), sharding,
                max_blocks_per_copy)
    log.info("host KV pool (%s): %d blocks (%.2f GB) on %d device(s), copies of up to %d blocks", transfer,
             num_blocks, pool.block_bytes * num_blocks / 1e9, len(pool.devices), pool.buckets[-1])
    return pool


class HostKVPool:
    """What both host pools share: the shapes, the bucketed on-device gather and scatter."""

    transfer: str

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding,
                 max_blocks_per_copy: int):
        self.shape, self.dtype, self.sharding = shape, dtype, sharding
        self.devices = sorted(sharding.addressable_devices, key=lambda d: d.id)
        self.buckets = copy_buckets(self._largest_piece(max_blocks_per_copy))
        self._gather_jit = jax.jit(_gather, out_shardings=(sharding, sharding))
        self._scatter_jit = jax.jit(_scatter, donate_argnums=(0, 1), out_shardings=(sharding, sharding))
        # Compiled ahead of time per bucket, like the step: a jit call would retrace when the pools
        # come out of the AOT-compiled step rather than from allocation.
        self._gathers: dict[int, jax.stages.Compiled] = {}
        self._scatters: dict[int, jax.stages.Compiled] = {}

    @property
    def block_bytes(self) -> int:
        """Bytes of one block, K and V, every layer, over this process's devices."""
        part = self.sharding.shard_shape(self.shape)
        return 2 * len(self.devices) * int(np.prod(part[:1] + part[2:])) * self.dtype.itemsize

    def _largest_piece(self, max_blocks_per_copy: int) -> int:
        """Blocks of the largest piece of a copy."""
        return max_blocks_per_copy

    def _pieces(self, pairs: list[tuple[int, int]]):
        """(sources, destinations) of each power-of-two piece of a copy."""
        start = 0
        for size in piece_sizes(len(pairs), self.buckets):
            piece = pairs[start:start + size]
            start += size
            yield np.array([p[0] for p in piece], np.int32), np.array([p[1] for p in piece], np.int32)

    def _gather(self, k_pool: jax.Array, v_pool: jax.Array, blocks: np.ndarray) -> tuple[jax.Array, jax.Array]:
        size = len(blocks)
        if size not in self._gathers:
            self._gathers[size] = self._gather_jit.lower(k_pool, v_pool, blocks).compile()
        return self._gathers[size](k_pool, v_pool, blocks)

    def _scatter(self, k_pool: jax.Array, v_pool: jax.Array, blocks: np.ndarray, k: jax.Array,
                 v: jax.Array) -> tuple[jax.Array, jax.Array]:
        size = len(blocks)
        if size not in self._scatters:
            self._scatters[size] = self._scatter_jit.lower(k_pool, v_pool, blocks, k, v).compile()
        return self._scatters[size](k_pool, v_pool, blocks, k, v)

    def copy_out(self, k_pool: jax.Array, v_pool: jax.Array, pairs: list[tuple[int, int]]) -> None:
        """Start copying device blocks to host blocks ((device, host) pairs); `land` finishes."""
        raise NotImplementedError

    def land(self) -> None:
        """Make the started swap-outs the content of their host blocks (after the step is dispatched)."""
        raise NotImplementedError

    def copy_in(self, k_pool: jax.Array, v_pool: jax.Array,
                pairs: list[tuple[int, int]]) -> tuple[jax.Array, jax.Array]:
        """Copy host blocks into device blocks ((host, device) pairs); returns the new pools.

        Must run before `land` in a step: a host block freed by this swap-in may be the
        destination of a swap-out started in the same step.
        """
        raise NotImplementedError

    def wait(self) -> None:
        """Block until the landed swap-outs are in host memory (measurements; `land` of the numpy
        pool already waits)."""

    def release(self, host_blocks: list[int]) -> None:
        """Forget free host blocks (after `land`). The numpy pool's blocks are preallocated slots:
        nothing to let go of."""

    def warmup(self, k_pool: jax.Array, v_pool: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Compile and run each bucket's copies both ways (device block 0 to host block 0 and back)."""
        for size in self.buckets:
            self.copy_out(k_pool, v_pool, [(PAD_BLOCK, 0)] * size)
            self.land()
            k_pool, v_pool = self.copy_in(k_pool, v_pool, [(0, PAD_BLOCK)] * size)
        self.release([0])
        return k_pool, v_pool


class NumpyHostPool(HostKVPool):
    """`num_blocks` pages per layer for K and V in numpy, one array per local device holding the
    part of the pool its device holds, so a process of a multi-host run keeps only its parts."""

    transfer = "numpy"

    def __init__(self, shape, dtype, sharding, max_blocks_per_copy):
        super().__init__(shape, dtype, sharding, max_blocks_per_copy)
        part_shape = sharding.shard_shape(shape)
        # Filled now, not lazily zero-mapped: first-touch page faults would land in a step.
        self.k = [np.empty(part_shape, dtype) for _ in self.devices]
        self.v = [np.empty(part_shape, dtype) for _ in self.devices]
        for array in self.k + self.v:
            array.fill(0)
        self._slot = {d: i for i, d in enumerate(self.devices)}
        self._pending: list[tuple[np.ndarray, tuple[jax.Array, jax.Array]]] = []

    def copy_out(self, k_pool, v_pool, pairs):
        for device_blocks, host_blocks in self._pieces(pairs):
            staged = self._gather(k_pool, v_pool, device_blocks)
            for array in staged:
                array.copy_to_host_async()
            self._pending.append((host_blocks, staged))

    def land(self):
        """Write the started swap-outs into the numpy pool (waits for their transfers)."""
        for host_blocks, staged in self._pending:
            for pool, array in zip((self.k, self.v), staged):
                for shard in array.addressable_shards:
                    pool[self._slot[shard.device]][:, host_blocks] = np.asarray(shard.data)
        self._pending.clear()

    def copy_in(self, k_pool, v_pool, pairs):
        for host_blocks, device_blocks in self._pieces(pairs):
            k, v = (self._to_devices(pool, host_blocks) for pool in (self.k, self.v))
            k_pool, v_pool = self._scatter(k_pool, v_pool, device_blocks, k, v)
        return k_pool, v_pool

    def _to_devices(self, pool: list[np.ndarray], host_blocks: np.ndarray) -> jax.Array:
        """Blocks `host_blocks` of every local part, each moved to its device, as one array split like the pools."""
        parts = [jax.device_put(part[:, host_blocks], d) for part, d in zip(pool, self.devices)]
        shape = (self.shape[0], len(host_blocks)) + self.shape[2:]
        return jax.make_array_from_single_device_arrays(shape, self.sharding, parts)


class _Pinned:
    """One swap-out piece in pinned host memory: the storage of the host blocks it was copied to."""

    __slots__ = ("k", "v")

    def __init__(self, k: jax.Array, v: jax.Array):
        self.k, self.v = k, v


class PinnedHostPool(HostKVPool):
    """Host blocks stored in the pinned arrays their swap-outs made; nothing preallocated."""

    transfer = "pinned_host"

    def __init__(self, shape, dtype, sharding, max_blocks_per_copy):
        super().__init__(shape, dtype, sharding, max_blocks_per_copy)
        self._pinned = sharding.with_memory_kind("pinned_host")
        self._where: dict[int, tuple[_Pinned, int]] = {}     # host block -> (its array, its row)
        self._pending: list[tuple[np.ndarray, _Pinned]] = []

    def _largest_piece(self, max_blocks_per_copy: int) -> int:
        """Within `PINNED_PIECE_BYTES` on each device: a swap-in moves whole pieces."""
        return pinned_piece_blocks(self.block_bytes // len(self.devices), max_blocks_per_copy)

    @property
    def num_arrays(self) -> int:
        """Pinned arrays the host blocks hold (0 once every swapped block is swapped in or freed)."""
        return len({array for array, _ in self._where.values()})

    def copy_out(self, k_pool, v_pool, pairs):
        for device_blocks, host_blocks in self._pieces(pairs):
            staged = self._gather(k_pool, v_pool, device_blocks)
            self._pending.append((host_blocks, _Pinned(*jax.device_put(staged, self._pinned))))

    def land(self):
        for host_blocks, array in self._pending:
            for row, block in enumerate(host_blocks.tolist()):
                self._where[block] = (array, row)
        self._pending.clear()

    def copy_in(self, k_pool, v_pool, pairs):
        targets: dict[_Pinned, np.ndarray] = {}      # per array, the device block of each row
        for host_block, device_block in pairs:
            array, row = self._where[host_block]
            if array not in targets:
                targets[array] = np.full(array.k.shape[1], PAD_BLOCK, np.int32)
            targets[array][row] = device_block
        for array, device_blocks in targets.items():
            k, v = jax.device_put((array.k, array.v), self.sharding)
            k_pool, v_pool = self._scatter(k_pool, v_pool, device_blocks, k, v)
        return k_pool, v_pool

    def wait(self):
        jax.block_until_ready([(array.k, array.v) for array, _ in self._where.values()])

    def release(self, host_blocks):
        for block in host_blocks:
            self._where.pop(block, None)
