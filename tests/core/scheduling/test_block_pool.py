"""BlockPool: allocation order, LRU eviction of cached blocks, ref counts, hashing."""

from __future__ import annotations

import pytest
from kvik.scheduling.block_pool import NULL_BLOCK_ID, BlockPool, hash_block_tokens


def _hashes(n: int) -> list[bytes]:
    out: list[bytes] = []
    for i in range(n):
        out.append(hash_block_tokens(out[-1] if out else None, [i, i + 1]))
    return out


def test_null_block_is_reserved() -> None:
    pool = BlockPool(num_blocks=5, block_size=2)
    assert pool.num_usable_blocks == pool.num_free_blocks == 4
    blocks = pool.get_new_blocks(4)
    assert NULL_BLOCK_ID not in [b.block_id for b in blocks]
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    with pytest.raises(ValueError, match="null block"):
        BlockPool(num_blocks=1, block_size=2)


def test_allocation_takes_head_and_sets_ref_count() -> None:
    pool = BlockPool(num_blocks=5, block_size=2)
    a = pool.get_new_blocks(2)
    assert [b.block_id for b in a] == [1, 2]
    assert all(b.ref_cnt == 1 for b in a)
    assert pool.free_block_ids() == [3, 4]
    assert pool.usage == 0.5


def test_lru_evicts_least_recently_freed_cached_block() -> None:
    pool = BlockPool(num_blocks=5, block_size=2)
    blocks = pool.get_new_blocks(3)
    h = _hashes(3)
    pool.cache_full_blocks(blocks, h)
    pool.free_blocks(reversed(blocks))  # a sequence frees its tail first
    assert pool.free_block_ids() == [4, 3, 2, 1]
    assert all(pool.get_cached_block(x) is not None for x in h)  # freed blocks keep their hash
    taken = pool.get_new_blocks(2)
    assert [b.block_id for b in taken] == [4, 3]
    assert pool.get_cached_block(h[2]) is None and taken[1].block_hash is None  # evicted: hash dropped
    assert pool.get_cached_block(h[0]) is blocks[0] and pool.get_cached_block(h[1]) is blocks[1]


def test_touch_takes_a_hit_out_of_the_free_queue_and_refree_goes_to_tail() -> None:
    pool = BlockPool(num_blocks=5, block_size=2)
    blocks = pool.get_new_blocks(2)
    h = _hashes(2)
    pool.cache_full_blocks(blocks, h)
    pool.free_blocks(reversed(blocks))
    assert pool.free_block_ids() == [3, 4, 2, 1]
    hit = pool.get_cached_block(h[0])
    assert hit is blocks[0]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and not pool.is_free(hit) and pool.num_free_blocks == 3
    pool.touch([hit])  # a second holder
    assert hit.ref_cnt == 2
    pool.free_blocks([hit])
    assert hit.ref_cnt == 1 and not pool.is_free(hit)
    pool.free_blocks([hit])
    assert pool.free_block_ids() == [3, 4, 2, 1]  # most recently used again: at the tail


def test_unhashed_blocks_are_reused_before_cached_ones_are_evicted() -> None:
    pool = BlockPool(num_blocks=5, block_size=2)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_blocks(blocks[:2], _hashes(2))
    pool.free_blocks(reversed(blocks))
    assert pool.free_block_ids() == [3, 4, 2, 1]
    assert [b.block_id for b in pool.get_new_blocks(2)] == [3, 4]
    assert pool.num_cached_blocks == 2


def test_double_free_is_caught() -> None:
    pool = BlockPool(num_blocks=3, block_size=2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks([block])


def test_duplicate_hash_keeps_the_first_block() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    a, b = pool.get_new_blocks(2)
    h = _hashes(1)
    pool.cache_full_blocks([a], h)
    pool.cache_full_blocks([b], h)
    assert pool.get_cached_block(h[0]) is a and b.block_hash is None
    pool.free_blocks([b, a])
    assert pool.free_block_ids()[0] == b.block_id  # the uncached duplicate is reused first


def test_reset_and_disabled_caching() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, _hashes(2))
    pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and all(b.block_hash is None for b in blocks)
    off = BlockPool(num_blocks=4, block_size=2, enable_caching=False)
    blocks = off.get_new_blocks(2)
    off.cache_full_blocks(blocks, _hashes(2))
    assert off.num_cached_blocks == 0


def test_block_hash_is_chained_and_keyed() -> None:
    root = hash_block_tokens(None, [1, 2])
    assert root == hash_block_tokens(None, [1, 2])  # deterministic
    assert len(root) == 32  # sha256
    assert hash_block_tokens(root, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [9, 9]), [3, 4])
    assert hash_block_tokens(None, [1, 2], ("lora", 1)) != root
    assert hash_block_tokens(None, [2, 1]) != root
