"""Paged KV cache bookkeeping: fixed-size blocks, a free list, per-sequence block tables,
and sharing of identical full prefix blocks by chained hash with reference counts.

The backend owns the KV memory; this class only decides which block ids hold which tokens.
A block whose reference count drops to zero keeps its hash and contents until it is handed
out again, so a later request with the same prefix (the next chat turn, a preempted sequence
being recomputed) can revive it instead of recomputing it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from inference_service.engine.sequence import Sequence


def chain_hash(prev: bytes | None, tokens: list[int]) -> bytes:
    """Hash of a full block given the hash of the block before it: equal hashes mean equal
    whole prefixes, not just equal blocks."""
    h = hashlib.blake2b(digest_size=16)
    if prev is not None:
        h.update(prev)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass
class PrefixMatch:
    """Cached full blocks that cover a sequence's first tokens."""

    block_ids: list[int]
    hashes: list[bytes]

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        # Free blocks without reusable contents are handed out first; free blocks that still
        # hold a hashed prefix are evicted least recently freed first.
        self._free_plain: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self.prefix_cache_hit_blocks = 0  # blocks reused instead of recomputed (cumulative)
        self.prefix_cache_queried_blocks = 0  # full blocks looked up on admission (cumulative)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that seq's table covers its first num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    # ---- prefix sharing ------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Longest run of cached full blocks equal to seq's first tokens. At least one token
        is always left to compute, so the step that follows has logits to sample from and
        never writes into a shared block."""
        match = PrefixMatch([], [])
        if not self.enable_prefix_caching:
            return match
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        prev: bytes | None = None
        for i in range(max_blocks):
            h = chain_hash(prev, seq.tokens_slice(i * bs, (i + 1) * bs))
            block = self._hash_to_block.get(h)
            if block is None:
                break
            match.block_ids.append(block)
            match.hashes.append(h)
            prev = h
        return match

    def prefix_cost(self, match: PrefixMatch) -> int:
        """Free blocks that reviving the matched blocks takes from the pool."""
        return sum(1 for b in match.block_ids if self.ref_counts[b] == 0)

    def admit(self, seq: Sequence, match: PrefixMatch) -> None:
        """Give a sequence without blocks the matched cached blocks (shared, ref-counted)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        self.prefix_cache_queried_blocks += (seq.num_tokens - 1) // self.block_size
        for block in match.block_ids:
            if self.ref_counts[block] == 0:
                self._free_cached.pop(block)
            self.ref_counts[block] += 1
        self.prefix_cache_hit_blocks += match.num_blocks
        seq.block_table = list(match.block_ids)
        seq.block_hashes = list(match.hashes)
        seq.num_computed_tokens = match.num_blocks * self.block_size

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of seq that became full of computed tokens, so later sequences
        with the same prefix can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), full):
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(prev, seq.tokens_slice(i * bs, (i + 1) * bs))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self._hash_to_block and self._block_hash[block] is None:
                self._hash_to_block[h] = block
                self._block_hash[block] = h

    # ---- allocation ----------------------------------------------------------------------
    def _take_free_block(self) -> int:
        if self._free_plain:
            block, _ = self._free_plain.popitem(last=False)
        else:
            block, _ = self._free_cached.popitem(last=False)
            self._forget_hash(block)  # its old contents get overwritten
        self.ref_counts[block] = 1
        return block

    def _forget_hash(self, block: int) -> None:
        h = self._block_hash[block]
        if h is not None:
            self._block_hash[block] = None
            if self._hash_to_block.get(h) == block:
                del self._hash_to_block[h]

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Extend seq's block table to cover num_tokens tokens. All or nothing: False (and
        nothing allocated) when the pool has too few free blocks."""
        need = self.num_new_blocks(seq, num_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (tail first, so a shared prefix stays cached the longest) and
        reset it to hold no KV at all."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if self._block_hash[block] is not None:
                    self._free_cached[block] = None
                else:
                    self._free_plain[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix held by free blocks."""
        for block in list(self._free_cached):
            self._forget_hash(block)
            self._free_plain[block] = None
        self._free_cached.clear()
