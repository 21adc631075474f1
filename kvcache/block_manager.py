"""Host-side paged KV bookkeeping: free lists, per-sequence block tables, ref counts.

Plain Python, no JAX: the scheduler and its tests use it directly. Block 0 of the device pool is
reserved as the padding block: padded token slots of a step write there and it is never handed
out.

A sequence's KV may be split between the pools. Its logical blocks are a device prefix followed by
a host suffix: swap-out moves the *last* device blocks to the front of the host part and swap-in
moves the *first* host blocks to the end of the device part (InferCept's partial swap, spec 2.1),
so a request can be moved a few blocks per step within the swap budget.

Host blocks freed (by a swap-in, or with a sequence) are remembered until the scheduler hands them
to the runner (`take_freed_host_blocks`): a host pool whose storage is per copy (the pinned pool)
lets go of it then.
"""
from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockPool:
    """A free list of block ids with reference counts."""

    def __init__(self, num_blocks: int, reserved: int = 0):
        if num_blocks < reserved:
            raise ValueError(f"a pool needs at least {reserved} blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.reserved = reserved
        self._free: deque[int] = deque(range(reserved, num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_blocks - self.reserved

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b < self.reserved or self._refs[b] <= 0:
                raise RuntimeError(f"double free or reserved block {b}")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._refs[block]


class BlockManager:
    """Block tables of live sequences over a device pool and a host (swap) pool.

    `ensure` grows a sequence's device table to hold `num_tokens`; `swap_out` / `swap_in` move
    blocks between the pools and return the (source, destination) copies the runner must make;
    `free` returns all of a sequence's blocks in both pools.
    """

    PAD_BLOCK = 0

    def __init__(self, num_device_blocks: int, block_size: int, num_host_blocks: int = 0):
        if num_device_blocks < 2:
            raise ValueError(f"the device pool needs at least 2 blocks (block 0 is reserved), got {num_device_blocks}")
        self.block_size = block_size
        self.device = BlockPool(num_device_blocks, reserved=1)
        self.host = BlockPool(num_host_blocks)
        self.tables: dict[str, list[int]] = {}
        self.host_tables: dict[str, list[int]] = {}
        self._host_freed: set[int] = set()

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """How many more device blocks `seq_id` needs to hold `num_tokens` tokens."""
        have = len(self.tables.get(seq_id, ())) + len(self.host_tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_ensure(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.device.num_free

    def ensure(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s device table to hold `num_tokens`; returns the table."""
        if self.host_tables.get(seq_id):
            raise RuntimeError(f"{seq_id} still has blocks in the host pool; swap them in first")
        new_blocks = self.device.allocate(self.blocks_needed(seq_id, num_tokens))
        table = self.tables.setdefault(seq_id, [])
        table.extend(new_blocks)
        return table

    def swap_out(self, seq_id: str, num_blocks: int) -> list[tuple[int, int]]:
        """Move the last `num_blocks` device blocks of `seq_id` to the host pool.

        Returns (device block, host block) copies. The device blocks are free at once: the runner
        copies them out before the step that may reuse them writes anything.
        """
        table = self.tables.get(seq_id, [])
        if not 0 < num_blocks <= len(table):
            raise ValueError(f"cannot swap out {num_blocks} of {seq_id}'s {len(table)} device blocks")
        host_blocks = self.host.allocate(num_blocks)
        moved = table[-num_blocks:]
        del table[-num_blocks:]
        self.device.free(moved)
        self.host_tables[seq_id] = host_blocks + self.host_tables.get(seq_id, [])
        return list(zip(moved, host_blocks))

    def swap_in(self, seq_id: str, num_blocks: int) -> list[tuple[int, int]]:
        """Move the first `num_blocks` host blocks of `seq_id` back to the device pool.

        Returns (host block, device block) copies, made before the step that reads them.
        """
        host_table = self.host_tables.get(seq_id, [])
        if not 0 < num_blocks <= len(host_table):
            raise ValueError(f"cannot swap in {num_blocks} of {seq_id}'s {len(host_table)} host blocks")
        device_blocks = self.device.allocate(num_blocks)
        moved = host_table[:num_blocks]
        del host_table[:num_blocks]
        if not host_table:
            del self.host_tables[seq_id]
        self.host.free(moved)
        self._host_freed.update(moved)
        self.tables.setdefault(seq_id, []).extend(device_blocks)
        return list(zip(moved, device_blocks))

    def free(self, seq_id: str) -> None:
        table = self.tables.pop(seq_id, None)
        if table:
            self.device.free(table)
        host_table = self.host_tables.pop(seq_id, None)
        if host_table:
            self.host.free(host_table)
            self._host_freed.update(host_table)

    def take_freed_host_blocks(self) -> list[int]:
        """Host blocks freed since the last call and still free. One freed and then given to a
        swap-out is left out: the swap-out replaces its content."""
        freed = sorted(b for b in self._host_freed if self.host.ref_count(b) == 0)
        self._host_freed.clear()
        return freed

    def num_blocks_of(self, seq_id: str) -> int:
        """Device blocks held by `seq_id`."""
        return len(self.tables.get(seq_id, ()))

    def num_host_blocks_of(self, seq_id: str) -> int:
        return len(self.host_tables.get(seq_id, ()))

    @property
    def num_free(self) -> int:
        return self.device.num_free

    def check_invariants(self) -> None:
        """Every non-reserved block of each pool is either free or in exactly one table (tests)."""
        for pool, tables in ((self.device, self.tables), (self.host, self.host_tables)):
            owned = [b for t in tables.values() for b in t]
            free = list(pool._free)
            assert len(set(owned)) == len(owned), "a block is in two tables"
            assert not set(owned) & set(free), "a block is both owned and free"
            assert len(set(free)) == len(free), "a block is free twice"
            assert len(owned) + len(free) == pool.capacity, "a block leaked"
        assert self.PAD_BLOCK not in [b for t in self.tables.values() for b in t]
        assert self.PAD_BLOCK not in list(self.device._free)
