"""`BlockManager`: fixed-size KV blocks, a free list, ref counts and the prefix cache.

Full blocks are named by a chained hash (previous block's hash, the block's token ids and
the LoRA adapter): two sequences whose first k blocks hold the same tokens share those k
physical blocks. A freed block keeps its hash while it sits on the free list, so a later
request with the same prefix can take it back; fresh allocations take the least recently
freed block first (blocks without a hash before any cached one), which is LRU eviction.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from hubdeploy.serving.sequence import Sequence


def chain_hash(prev_hash: int | None, token_ids: list[int] | tuple[int, ...], lora_name: str | None) -> int:
    """Hash of one full block given the hash of the block before it (None for the first)."""
    return hash((prev_hash, lora_name if prev_hash is None else None, tuple(token_ids)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the cache
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in eviction order: first = taken first
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # blocks looked up in the cache
        self.prefix_hits = 0  # of which found

    # --- accounting ------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add to `seq` so it can hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    # --- low level -------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]  # evict its cached contents
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count < 0:
            raise RuntimeError(f"block {block_id} freed more times than allocated")
        if block.ref_count == 0:
            self.free[block_id] = None
            if block.hash is None or not self.enable_prefix_caching:
                self.free.move_to_end(block_id, last=False)  # nothing worth keeping: reuse first

    # --- sequence level --------------------------------------------------------------
    def allocate_prefix(self, seq: Sequence) -> tuple[int, int]:
        """First allocation of a sequence: take shared blocks for the cached part of its prefix.

        Only blocks that end before the last token are looked up, so at least one token is
        always computed (its logits are needed) and shared blocks are never written to.
        Returns the (queries, hits) it added to the counters, for `uncount_lookup`.
        """
        assert not seq.block_table, "allocate_prefix on a sequence that already holds blocks"
        if not self.enable_prefix_caching:
            return 0, 0
        q0, h0 = self.prefix_queries, self.prefix_hits
        prev: int | None = None
        num_lookup = (len(seq.token_ids) - 1) // self.block_size
        for i in range(num_lookup):
            tokens = tuple(seq.block_tokens(i, self.block_size))
            h = chain_hash(prev, tokens, seq.lora_name)
            self.prefix_queries += 1
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                self.prefix_queries += num_lookup - i - 1  # count the rest as misses
                break
            self.prefix_hits += 1
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        if seq.num_preemptions == 0:  # usage reports the prompt's hits, not a resume's
            seq.num_cached_tokens = seq.num_computed_tokens
        return self.prefix_queries - q0, self.prefix_hits - h0

    def uncount_lookup(self, lookup: tuple[int, int]) -> None:
        """Take back an `allocate_prefix` lookup whose blocks went back unused (counted on admission)."""
        self.prefix_queries -= lookup[0]
        self.prefix_hits -= lookup[1]

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table so it can hold `num_tokens` tokens (caller checked room)."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            raise RuntimeError(f"need {need} KV blocks, only {len(self.free)} free")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= len(seq.block_hashes):  # no block completed since the last commit (most steps)
            return
        prev = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.block_tokens(i, self.block_size))
            h = chain_hash(prev, tokens, seq.lora_name)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.hash_to_block.setdefault(h, block.block_id)  # first writer wins; duplicates stay private
            seq.block_hashes.append(h)
            prev = h

    def free_seq(self, seq: Sequence) -> None:
        """Release all blocks of `seq` (on finish, abort or preemption); last block first."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        self.hash_to_block.clear()
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash, block.token_ids = None, ()
