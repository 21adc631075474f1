"""BlockManager invariants under random operations: no leak, no double free, no block in two tables."""
from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvcache.block_manager import BlockManager, OutOfBlocks


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_device_blocks=33, block_size=4)
        self.lengths: dict[str, int] = {}

    @rule(seq=st.sampled_from("abcdefgh"), grow=st.integers(1, 40))
    def ensure(self, seq, grow):
        want = self.lengths.get(seq, 0) + grow
        need = self.bm.blocks_needed(seq, want)
        if self.bm.can_ensure(seq, want):
            table = self.bm.ensure(seq, want)
            self.lengths[seq] = want
            assert len(table) * 4 >= want > (len(table) - 1) * 4
        else:
            free_before = self.bm.num_free
            with pytest.raises(OutOfBlocks):
                self.bm.ensure(seq, want)
            assert need > free_before
            assert self.bm.num_free == free_before
            assert seq in self.lengths or seq not in self.bm.tables

    @rule(seq=st.sampled_from("abcdefgh"))
    def free(self, seq):
        self.bm.free(seq)
        self.lengths.pop(seq, None)

    @invariant()
    def consistent(self):
        self.bm.check_invariants()
        for seq, n in self.lengths.items():
            assert self.bm.num_blocks_of(seq) == -(-n // 4)


TestBlockManager = BlockManagerMachine.TestCase


def test_double_free_is_caught():
    bm = BlockManager(8, 4)
    blocks = bm.device.allocate(2)
    bm.device.free(blocks)
    with pytest.raises(RuntimeError, match="double free"):
        bm.device.free(blocks)


def test_padding_block_is_never_handed_out():
    bm = BlockManager(5, 4)
    assert sorted(bm.ensure("a", 16)) == [1, 2, 3, 4]
    with pytest.raises(OutOfBlocks):
        bm.ensure("b", 1)


def test_swap_of_zero_blocks_or_an_unknown_sequence_is_refused():
    bm = BlockManager(8, 4, num_host_blocks=8)
    bm.ensure("a", 12)                                   # 3 device blocks
    for bad in (lambda: bm.swap_out("a", 0), lambda: bm.swap_out("a", 4), lambda: bm.swap_out("nobody", 1),
                lambda: bm.swap_in("a", 1)):             # nothing of "a" on the host yet
        with pytest.raises(ValueError, match="cannot swap"):
            bad()
    assert bm.num_blocks_of("a") == 3 and bm.num_host_blocks_of("a") == 0
    bm.swap_out("a", 2)
    for bad in (lambda: bm.swap_in("a", 0), lambda: bm.swap_in("a", 3), lambda: bm.swap_in("nobody", 1)):
        with pytest.raises(ValueError, match="cannot swap"):
            bad()
    assert (bm.num_blocks_of("a"), bm.num_host_blocks_of("a")) == (1, 2)
    bm.check_invariants()


def test_swap_returns_the_copies_in_order_and_a_whole_sequence_round_trips():
    bm = BlockManager(8, 4, num_host_blocks=8)
    assert bm.ensure("a", 12) == [1, 2, 3]
    assert bm.swap_out("a", 1) == [(3, 0)]               # the last device block to the first host block
    assert bm.swap_out("a", 2) == [(1, 1), (2, 2)]       # the rest goes in front of it on the host
    assert bm.host_tables["a"] == [1, 2, 0] and bm.num_blocks_of("a") == 0
    # the first host blocks come back first, to the oldest free device blocks (3, 1, 2 were freed last)
    assert bm.swap_in("a", 2) == [(1, 4), (2, 5)]
    assert bm.swap_in("a", 1) == [(0, 6)]
    assert bm.tables["a"] == [4, 5, 6] and bm.num_host_blocks_of("a") == 0
    bm.check_invariants()


def test_pool_sizes_and_what_a_partly_swapped_sequence_may_do():
    assert BlockManager(2, 4).device.capacity == 1              # the smallest pool: 1 block + padding
    assert BlockManager(4, 4).host.capacity == 0                # no host pool unless asked for
    bm = BlockManager(8, 4, num_host_blocks=4)
    with pytest.raises(RuntimeError, match="double free"):
        bm.device.free([5])                                     # never handed out
    bm.ensure("a", 12)
    bm.swap_out("a", 1)                                         # 2 blocks on the device, 1 on the host
    assert bm.blocks_needed("a", 16) == 1 and bm.blocks_needed("a", 12) == 0
    with pytest.raises(RuntimeError, match="host pool"):
        bm.ensure("a", 16)


def test_freed_host_blocks_are_handed_over_once_and_only_while_still_free():
    """A swap-in and a sequence's end free host blocks; one given to a swap-out since is not
    handed over (the swap-out replaces its content)."""
    bm = BlockManager(12, block_size=4, num_host_blocks=4)
    bm.ensure("a", 16)
    bm.ensure("b", 8)
    assert bm.swap_out("a", 3) == [(2, 0), (3, 1), (4, 2)]
    bm.swap_in("a", 1)                                 # host block 0
    bm.free("a")                                       # host blocks 1, 2
    assert [h for _, h in bm.swap_out("b", 2)] == [3, 0]
    assert bm.take_freed_host_blocks() == [1, 2]       # 0 went to b
    assert bm.take_freed_host_blocks() == []
    bm.free("b")
    assert bm.take_freed_host_blocks() == [0, 3]
