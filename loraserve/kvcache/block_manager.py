"""Paged KV block manager with prefix caching.

Blocks hold ``block_size`` tokens. A *full* block is content-addressed by a chained hash
``h_i = H(h_{i-1}, tokens of block i)`` whose seed ``h_{-1}`` is the adapter's content hash (the
empty string for the base model), so the base model and every distinct adapter weight set get
disjoint caches, and two adapters registered under one name with different weights never share KV.

Freed blocks keep their hash and stay findable until the block is handed out again (oldest freed
first), so a later request with the same prefix reuses them without recomputation.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass


def block_hash(parent: bytes, tokens: list[int] | tuple[int, ...]) -> bytes:
    """Chained content hash of one full block: sha256 over the parent hash, the token count
    (4 bytes, little-endian, unsigned) and each token id (4 bytes, little-endian, signed)."""
    n = len(tokens)
    # One pack for the whole block: hashing block by block is on the step's host path.
    return hashlib.sha256(parent + struct.pack(f"<I{n}i", n, *tokens)).digest()


@functools.lru_cache(maxsize=4096)
def seed_hash(adapter_hash: str | None) -> bytes:
    """The chain seed: distinct for the base model and for every adapter content hash."""
    return hashlib.sha256(b"lora:" + (adapter_hash or "").encode()).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockManager:
    """Free list, reference counts and the prefix-hash table for ``num_blocks`` KV blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered set: popping from the front reuses the longest-freed block first.
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.hits = 0
        self.queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free / max(1, self.num_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, tokens: list[int], seed: bytes) -> tuple[list[int], list[bytes]]:
        """Longest run of cached full blocks for ``tokens``, never covering the last token.

        The last token is always recomputed (its logits are needed), so at most
        ``(len(tokens) - 1) // block_size`` blocks can hit. Returns the block ids and their hashes.
        """
        ids: list[int] = []
        hashes: list[bytes] = []
        if not self.enable_prefix_caching:
            return ids, hashes
        parent = seed
        for i in range((len(tokens) - 1) // self.block_size):
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            bid = self.hash_to_block.get(h)
            if bid is None:
                break
            ids.append(bid)
            hashes.append(h)
            parent = h
        return ids, hashes

    def can_allocate(self, num_new_blocks: int, hit_ids: list[int]) -> bool:
        """Whether ``num_new_blocks`` fresh blocks fit, counting hit blocks that sit on the free list."""
        reclaimed = sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        return self.num_free - reclaimed >= num_new_blocks

    def take_cached(self, block_ids: list[int]) -> None:
        """Add a reference to prefix-cache hits (pulling free ones back off the free list)."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_ids[bid]
            block.ref_count += 1

    def allocate(self, n: int) -> list[int]:
        """Hand out ``n`` fresh blocks (caller checked :meth:`can_allocate`)."""
        out = []
        for _ in range(n):
            bid, _ = self.free_ids.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None and self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            block.hash = None
            block.ref_count = 1
            out.append(bid)
        return out

    def register_full(self, block_id: int, h: bytes) -> None:
        """Publish a block that has just become full under its chained hash."""
        if not self.enable_prefix_caching:
            return
        self.blocks[block_id].hash = h
        self.hash_to_block.setdefault(h, block_id)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no sequence holds (they stay free, as fresh blocks); returns how
        many. Blocks in use keep their hashes: their contents are live and correct."""
        dropped = 0
        for bid in self.free_ids:
            block = self.blocks[bid]
            if block.hash is not None:
                if self.hash_to_block.get(block.hash) == bid:
                    del self.hash_to_block[block.hash]
                block.hash = None
                dropped += 1
        return dropped

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; unreferenced blocks go to the back of the free list."""
        for bid in reversed(block_ids):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[bid] = None
