"""Host-side paged KV bookkeeping: free lists, per-sequence block tables, ref counts.

Plain Python, no JAX: the scheduler and its tests use it directly. Block 0 of the device pool is
reserved as the padding block: padded token slots of a step write there and it is never handed
out. The host pool (swap space) is a second free list that the interception work fills in.
"""
from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockPool:
    """A free list of block ids with reference counts."""

    def __init__(self, num_blocks: int, reserved: int = 0):
        if num_blocks <= reserved:
            raise ValueError(f"a pool needs more than {reserved} blocks, got {num_blocks}")
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
    """Block tables of live sequences over a device pool.

    A sequence's table covers the tokens that have (or are about to get) KV. `ensure` grows a
    table to hold `num_tokens`; `free` returns all of a sequence's blocks.
    """

    PAD_BLOCK = 0

    def __init__(self, num_device_blocks: int, block_size: int):
        self.block_size = block_size
        self.device = BlockPool(num_device_blocks, reserved=1)
        self.tables: dict[str, list[int]] = {}

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """How many more device blocks `seq_id` needs to hold `num_tokens` tokens."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_ensure(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.device.num_free

    def ensure(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens`; returns the table."""
        new_blocks = self.device.allocate(self.blocks_needed(seq_id, num_tokens))
        table = self.tables.setdefault(seq_id, [])
        table.extend(new_blocks)
        return table

    def free(self, seq_id: str) -> None:
        table = self.tables.pop(seq_id, None)
        if table:
            self.device.free(table)

    def num_blocks_of(self, seq_id: str) -> int:
        return len(self.tables.get(seq_id, ()))

    @property
    def num_free(self) -> int:
        return self.device.num_free

    def check_invariants(self) -> None:
        """Every non-reserved block is either free or in exactly one table (used by tests)."""
        owned = [b for t in self.tables.values() for b in t]
        free = list(self.device._free)
        assert len(set(owned)) == len(owned), "a block is in two tables"
        assert not set(owned) & set(free), "a block is both owned and free"
        assert len(set(free)) == len(free), "a block is free twice"
        assert len(owned) + len(free) == self.device.capacity, "a block leaked"
        assert self.PAD_BLOCK not in owned and self.PAD_BLOCK not in free
