"""Paged KV cache. The host side (`block_manager`) is plain Python; the device side
(`kvcache.paged`, `kvcache.swap`) imports JAX and is imported explicitly by the runner, never from
here."""
from kvcache.block_manager import BlockManager, BlockPool, OutOfBlocks

__all__ = ["BlockManager", "BlockPool", "OutOfBlocks"]
