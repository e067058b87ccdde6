"""BlockPool against a plain-list model of its LRU free queue (hypothesis state machine)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kvik.scheduling.block_pool import BlockPool, hash_block_tokens

NUM_BLOCKS = 9


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, block_size=2)
        # Model: free list (head = next to evict), ref counts, hash of each block, hash -> block.
        self.free = list(range(1, NUM_BLOCKS))
        self.refs = [0] * NUM_BLOCKS
        self.hash_of: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}
        self.held: list[int] = []  # one entry per reference taken (a multiset of block ids)
        self.counter = 0

    @rule(n=st.integers(0, 3))
    def allocate(self, n: int) -> None:
        if n > len(self.free):
            return
        got = [b.block_id for b in self.pool.get_new_blocks(n)]
        want = self.free[:n]
        del self.free[:n]
        for block_id in want:
            h = self.hash_of.pop(block_id, None)
            if h is not None:
                del self.cached[h]
            self.refs[block_id] = 1
        assert got == want
        self.held += got

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free_one(self, data: st.DataObject) -> None:
        block_id = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.free_blocks([self.pool.blocks[block_id]])
        self.refs[block_id] -= 1
        if self.refs[block_id] == 0:
            if block_id in self.hash_of:
                self.free.append(block_id)
            else:
                self.free.insert(0, block_id)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), reuse=st.booleans())
    def cache_one(self, data: st.DataObject, reuse: bool) -> None:
        block_id = data.draw(st.sampled_from(self.held))
        if block_id in self.hash_of:
            return
        if reuse and self.cached:  # a second block computing an already cached prefix
            h = data.draw(st.sampled_from(sorted(self.cached)))
        else:
            self.counter += 1
            h = hash_block_tokens(None, [self.counter])
        self.pool.cache_full_blocks([self.pool.blocks[block_id]], [h])
        if h not in self.cached:
            self.cached[h] = block_id
            self.hash_of[block_id] = h

    @precondition(lambda self: self.cached)
    @rule(data=st.data())
    def hit(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(sorted(self.cached)))
        block = self.pool.get_cached_block(h)
        assert block is not None and block.block_id == self.cached[h]
        self.pool.touch([block])
        if self.refs[block.block_id] == 0:
            self.free.remove(block.block_id)
        self.refs[block.block_id] += 1
        self.held.append(block.block_id)

    @rule()
    def reset(self) -> None:
        self.pool.reset_prefix_cache()
        self.hash_of.clear()
        self.cached.clear()

    @invariant()
    def matches_model(self) -> None:
        assert self.pool.free_block_ids() == self.free
        assert [b.ref_cnt for b in self.pool.blocks[1:]] == self.refs[1:]
        assert {b.block_id: b.block_hash for b in self.pool.blocks if b.block_hash} == self.hash_of
        assert self.pool.num_cached_blocks == len(self.cached)


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestBlockPoolModel = PoolMachine.TestCase
