"""KVCacheManager: the max-hit rule, all-or-nothing allocation, tail-first freeing, stats."""

from __future__ import annotations

from kvik.request import Request
from kvik.scheduling.kv_cache_manager import KVCacheManager
from sched_harness import make_request


def _compute(kv: KVCacheManager, request: Request) -> None:
    """Admit a request with its prefix hits and pretend its whole prompt was computed."""
    hits, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit, hits) is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request, request.num_computed_tokens)


def test_hits_never_cover_the_last_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64)
    prompt = list(range(10, 22))  # 12 tokens = 3 full blocks
    _compute(kv, make_request("a", prompt))
    a_blocks = kv.get_blocks("a")

    # Same 8 tokens: 2 full blocks cached, but the 8th token must be computed -> 1 block.
    hits, n = kv.get_computed_blocks(make_request("b", prompt[:8]))
    assert n == 4 and hits == a_blocks[:1]
    # 9 tokens: both full blocks can be reused, token 9 is computed.
    hits, n = kv.get_computed_blocks(make_request("c", prompt[:9]))
    assert n == 8 and hits == a_blocks[:2]
    # The whole 12-token prompt: capped at (12 - 1) // 4 = 2 blocks.
    hits, n = kv.get_computed_blocks(make_request("d", prompt))
    assert n == 8
    # A different first token changes every chained hash.
    assert kv.get_computed_blocks(make_request("e", [99, *prompt[1:]]))[1] == 0


def test_extra_keys_and_prompt_logprobs_skip_hits() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64)
    prompt = list(range(10, 22))
    _compute(kv, make_request("a", prompt))
    salted = make_request("b", prompt)
    salted.cache_extra_keys = ("lora", 3)
    assert kv.get_computed_blocks(salted)[1] == 0
    assert kv.get_computed_blocks(make_request("c", prompt, prompt_logprobs=1))[1] == 0
    off = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64, enable_prefix_caching=False)
    _compute(off, make_request("a", prompt))
    assert off.get_computed_blocks(make_request("b", prompt))[1] == 0
    assert off.pool.num_cached_blocks == 0


def test_allocation_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=4, max_model_len=64)  # 4 usable blocks
    a = make_request("a", list(range(8)))
    assert kv.allocate_slots(a, 8) is not None and kv.num_free_blocks == 2
    b = make_request("b", list(range(100, 112)))
    assert kv.allocate_slots(b, 12) is None  # needs 3
    assert kv.num_free_blocks == 2 and kv.get_blocks("b") == []
    assert kv.allocate_slots(b, 8) is not None and kv.num_free_blocks == 0
    assert kv.usage == 1.0


def test_growing_allocates_only_when_a_block_fills() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, max_model_len=64)
    a = make_request("a", list(range(6)))
    assert len(kv.allocate_slots(a, 6) or []) == 2
    a.num_computed_tokens = 6
    for expected_new in (0, 0, 1):  # tokens 7, 8 fit block 2; token 9 opens block 3
        a.append_output_token(5)
        assert len(kv.allocate_slots(a, 1) or []) == expected_new
        a.num_computed_tokens += 1
    assert len(kv.get_block_ids(a)) == 3


def test_hits_on_free_blocks_count_against_free_space() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=4, max_model_len=64)  # 4 usable
    prompt = list(range(12))
    a = make_request("a", prompt)
    _compute(kv, a)
    kv.free(a)  # 3 cached blocks, all free again
    assert kv.num_free_blocks == 4
    b = make_request("b", [*prompt, 1, 2, 3, 4, 5, 6])  # 18 tokens: 3 hits + 2 new blocks > 4
    hits, n = kv.get_computed_blocks(b)
    assert n == 12
    assert kv.allocate_slots(b, b.num_tokens - n, hits) is None
    assert all(h.ref_cnt == 0 for h in hits) and kv.num_free_blocks == 4
    c = make_request("c", [*prompt, 1, 2, 3])  # 3 hits + 1 new block
    hits, n = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, c.num_tokens - n, hits) is not None
    assert kv.get_blocks("c")[:3] == hits and kv.num_free_blocks == 0


def test_free_releases_the_tail_first() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2, max_model_len=64)
    a = make_request("a", list(range(7)))  # 3 full blocks + 1 partial
    _compute(kv, a)
    ids = kv.get_block_ids(a)
    kv.free(a)
    # Unhashed partial block first (nothing to keep), then cached blocks tail first.
    order = kv.pool.free_block_ids()
    assert order[0] == ids[3]
    assert order[-3:] == [ids[2], ids[1], ids[0]]


def test_prefix_cache_stats_count_admissions() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64)
    prompt = list(range(9))
    _compute(kv, make_request("a", prompt))
    _compute(kv, make_request("b", prompt))
    stats = kv.prefix_cache_stats
    assert (stats.queries, stats.hits) == (18, 8)
    assert stats.hit_rate == 8 / 18
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("c", prompt))[1] == 0


def test_releasing_leading_blocks_keeps_the_table_length_and_their_cached_kv() -> None:
    """Blocks a sliding window has passed go back to the pool (the null block stands in for them); their
    KV stays hittable until evicted, and freeing the request later releases only the rest."""
    kv = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64)
    prompt = list(range(10, 30))  # 20 tokens = 5 full blocks
    a = make_request("a", prompt)
    _compute(kv, a)
    blocks = list(kv.get_blocks("a"))
    free_before = kv.num_free_blocks
    assert kv.release_leading_blocks("a", 2)
    assert not kv.release_leading_blocks("a", 2)  # already released
    assert kv.num_free_blocks == free_before + 2
    assert kv.get_block_ids(a)[:2] == [0, 0] and kv.get_block_ids(a)[2:] == [b.block_id for b in blocks[2:]]
    assert len(kv.get_blocks("a")) == 5
    # The released blocks' KV is still cached: a request with the same prompt hits all four blocks.
    hits, n = kv.get_computed_blocks(make_request("b", prompt))
    assert n == 16 and hits[:2] == blocks[:2]
    kv.free(a)  # no double free of the released two, nor of the null block
    assert kv.num_free_blocks == 15


def test_blocks_released_before_they_were_registered_stay_unregistered() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64)
    a = make_request("a", list(range(10, 30)))
    assert kv.allocate_slots(a, 20) is not None
    assert kv.release_leading_blocks("a", 3)
    a.num_computed_tokens = 20
    kv.cache_blocks(a, 20)  # registers blocks 3 and 4 only, never the null block
    assert kv.pool.num_cached_blocks == 2


def test_a_windowed_hit_needs_only_the_blocks_its_window_shows() -> None:
    """Every layer slides with window 5 (blocks of 4): a prompt whose first blocks were evicted still hits its
    later blocks, the null block standing in for the evicted ones, which the next query's window does not show.
    Freeing the new request drops its references to the shared blocks only."""
    kv = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64, group_windows=(5,))
    prompt = list(range(10, 35))  # 25 tokens: 6 full blocks and one token
    a = make_request("a", prompt)
    _compute(kv, a)
    blocks = list(kv.get_blocks("a"))
    assert kv.release_leading_blocks("a", 2)  # blocks 0 and 1 go to the free queue's tail ...
    x = make_request("x", list(range(100, 140)))
    assert kv.allocate_slots(x, 40) is not None  # ... and are evicted: x takes every free block
    assert kv.num_free_blocks == 0 and kv.pool.get_cached_block(kv.block_hashes(a)[0]) is None

    b = make_request("b", prompt)
    hits, n = kv.get_computed_blocks(b)
    # 6 blocks hit (24 tokens): the query at position 24 sees keys 20.. (block 5), with one block of margin: 4, 5.
    assert n == 24 and kv.first_needed_block(24) == 4
    assert hits == [kv.pool.null_block] * 4 + blocks[4:6]
    assert kv.allocate_slots(b, 1, hits) is None  # no free block for the 25th token
    kv.free(x)
    assert kv.allocate_slots(b, 1, hits) is not None
    assert kv.get_block_ids(b)[:4] == [0] * 4 and kv.get_block_ids(b)[4:6] == [blk.block_id for blk in blocks[4:6]]
    assert [blk.ref_cnt for blk in blocks[4:6]] == [2, 2] and kv.pool.null_block.ref_cnt == 1
    kv.free(b)
    assert [blk.ref_cnt for blk in blocks[4:6]] == [1, 1]
    kv.free(a)
    assert kv.num_free_blocks == 15

    # Without a window the evicted first block ends the hit.
    plain = KVCacheManager(num_blocks=16, block_size=4, max_model_len=64)
    c = make_request("c", prompt)
    _compute(plain, c)
    plain.pool.reset_prefix_cache()
    assert plain.get_computed_blocks(make_request("d", prompt))[1] == 0


def test_groups_hold_a_block_each_per_position_and_release_apart() -> None:
    """Two groups (global, window 5; blocks of 4): each position takes one block per group, interleaved; only
    the sliding group releases, and freeing returns every block it still holds once."""
    kv = KVCacheManager(num_blocks=32, block_size=4, max_model_len=64, group_windows=(None, 5))
    a = make_request("a", list(range(10, 34)))  # 24 tokens: 6 positions
    assert kv.allocate_slots(a, 24) is not None
    assert len(kv.get_blocks("a")) == 12 and kv.num_free_blocks == 31 - 12
    a.num_computed_tokens = 24
    assert kv.release_behind_window(a)  # the query at 24 sees keys 20..: positions 4, 5, one of margin before
    ids = kv.get_block_ids(a)
    assert all(i != 0 for i in ids[0::2])  # the global group keeps every block
    assert ids[1::2][:4] == [0] * 4 and all(i != 0 for i in ids[1::2][4:])
    assert kv.num_free_blocks == 31 - 8
    kv.free(a)
    assert kv.num_free_blocks == 31


def test_a_grouped_hit_needs_every_global_block_and_the_window_of_each_sliding_group() -> None:
    """A prompt's blocks are cached under a key per group. A later request with the same prompt hits the
    global group's whole prefix and, in the sliding group, only what its window shows (the null block for the
    rest, though those were cached too); a hit stops where the global group's chain breaks."""
    kv = KVCacheManager(num_blocks=64, block_size=4, max_model_len=64, group_windows=(None, 5))
    prompt = list(range(10, 35))  # 25 tokens: 6 full blocks and one token
    a = make_request("a", prompt)
    _compute(kv, a)
    table = kv.get_blocks("a")
    assert kv.pool.num_cached_blocks == 12  # each full position, in both groups
    hits, n = kv.get_computed_blocks(make_request("b", prompt))
    null = kv.pool.null_block
    assert n == 24 and len(hits) == 12
    assert hits[0::2] == table[0::2][:6]  # global: every position
    assert hits[1::2] == [null] * 4 + table[1::2][4:6]  # sliding: positions 4 and 5 (window and margin)
    # Evict the global group's block at position 2: the hit ends before it, whatever the sliding group holds.
    kv.free(a)
    victim = table[4]  # position 2, group 0
    kv.pool.touch([victim])
    kv.pool._evict(victim)
    hits, n = kv.get_computed_blocks(make_request("c", prompt))
    assert n == 8 and hits[0::2] == table[0::2][:2]
    # Both groups' positions 0 and 1 (a window of 5 at query 8 needs position 0 as margin: (8-5+1)//4-1 = 0).
    assert hits[1::2] == table[1::2][:2]


def test_grouped_hits_take_references_only_on_real_blocks() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, max_model_len=64, group_windows=(None, 5))
    prompt = list(range(10, 35))
    _compute(kv, make_request("a", prompt))
    b = make_request("b", prompt)
    hits, n = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, b.num_tokens - n, hits) is not None
    null = kv.pool.null_block
    assert null.ref_cnt == 1 and all(h.ref_cnt == 2 for h in hits if h is not null)
    assert len(kv.get_blocks("b")) == 14  # 6 hit positions and the 25th token's, in both groups
    kv.free(b)
    assert all(h.ref_cnt == 1 for h in hits if h is not null)
