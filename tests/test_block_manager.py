"""BlockManager: allocation, ref counts, prefix-cache hashing, LRU eviction, no leaks."""
from __future__ import annotations

import pytest

from hubdeploy.serving.block_manager import BlockManager
from hubdeploy.serving.sampling_params import SamplingParams
from hubdeploy.serving.sequence import Sequence

BS = 4


def seq(tokens: list[int], lora: str | None = None) -> Sequence:
    return Sequence("r", tokens, SamplingParams(), lora_name=lora)


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    """What the scheduler + engine do for a whole prompt in one step."""
    bm.allocate_prefix(s)
    bm.allocate(s, len(s.token_ids))
    s.num_computed_tokens = len(s.token_ids)
    bm.commit(s)


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(8, BS)
    s = seq(list(range(10)))  # 3 blocks
    assert bm.blocks_needed(s, 10) == 3 and bm.can_allocate(s, 10)
    run_prefill(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_append_grows_one_block_at_a_boundary() -> None:
    bm = BlockManager(8, BS)
    s = seq([1, 2, 3, 4])
    run_prefill(bm, s)
    assert len(s.block_table) == 1
    s.append_token(5)
    assert bm.blocks_needed(s, 5) == 1
    bm.allocate(s, 5)
    assert len(s.block_table) == 2
    s.append_token(6)
    assert bm.blocks_needed(s, 6) == 0


def test_cannot_allocate_more_than_free() -> None:
    bm = BlockManager(2, BS)
    s = seq(list(range(9)))
    assert not bm.can_allocate(s, 9)
    with pytest.raises(RuntimeError, match="need 3 KV blocks"):
        bm.allocate(s, 9)


def test_shared_prefix_hits_and_ref_counts() -> None:
    bm = BlockManager(16, BS)
    a = seq(list(range(10)))  # full blocks [0..3], [4..7]
    run_prefill(bm, a)
    b = seq(list(range(8)) + [99, 98, 97])
    bm.allocate_prefix(b)
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.prefix_hits == 2 and bm.prefix_queries == 2 + 2  # a queried 2 (misses), b 2 hits
    assert [bm.blocks[x].ref_count for x in b.block_table] == [2, 2]
    bm.allocate(b, 11)
    assert b.block_table[2] != a.block_table[2]
    bm.free_seq(a)
    assert [bm.blocks[x].ref_count for x in b.block_table[:2]] == [1, 1]
    bm.free_seq(b)
    assert bm.num_free_blocks == 16


def test_prompt_fully_cached_still_computes_its_last_token() -> None:
    bm = BlockManager(16, BS)
    a = seq(list(range(8)))
    run_prefill(bm, a)
    b = seq(list(range(8)))
    bm.allocate_prefix(b)
    # only the first block may be reused: the last token (and its block) is recomputed
    assert b.num_computed_tokens == 4 and len(b.block_table) == 1


def test_hash_is_chained_and_lora_aware() -> None:
    bm = BlockManager(16, BS)
    run_prefill(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other_first = seq([0, 0, 0, 0, 5, 6, 7, 8, 9])  # same 2nd block, different 1st block
    bm.allocate_prefix(other_first)
    assert other_first.num_computed_tokens == 0
    lora = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], lora="adapter")
    bm.allocate_prefix(lora)
    assert lora.num_computed_tokens == 0  # different adapter: different K/V


def test_freed_cached_blocks_are_reused_and_evicted_lru() -> None:
    bm = BlockManager(4, BS)
    a = seq(list(range(9)))  # 3 blocks, 2 full ones cached
    run_prefill(bm, a)
    cached = a.block_table[:2]
    bm.free_seq(a)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    # a fresh allocation takes the blocks without a hash first, then the LRU cached block
    # (the deeper block of the chain goes before the first one)
    c = seq([50, 51, 52, 53, 54])
    bm.allocate_prefix(c)
    bm.allocate(c, 2 * BS)
    assert set(c.block_table).isdisjoint(cached)
    bm.allocate(c, 3 * BS)
    assert c.block_table[2] == cached[1]
    # the first cached block survived and is still a hit
    d = seq(list(range(5)))
    bm.allocate_prefix(d)
    assert d.block_table == [cached[0]] and d.num_computed_tokens == 4
    # a block whose cached contents were evicted is no hit any more
    e = seq(list(range(9)))
    bm.free_seq(d)
    bm.allocate_prefix(e)
    assert e.num_computed_tokens == 4  # block 2 of the chain was overwritten by c
    bm.free_seq(e)
    bm.free_seq(c)
    assert bm.num_free_blocks == 4 and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    run_prefill(bm, seq(list(range(9))))
    b = seq(list(range(9)))
    bm.allocate_prefix(b)
    assert b.num_computed_tokens == 0 and bm.prefix_queries == 0


def test_double_free_is_an_error() -> None:
    bm = BlockManager(4, BS)
    s = seq([1, 2])
    run_prefill(bm, s)
    table = list(s.block_table)
    bm.free_seq(s)
    s.block_table = table
    with pytest.raises(RuntimeError, match="freed more times"):
        bm.free_seq(s)
