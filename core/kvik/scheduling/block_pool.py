"""Fixed-size KV blocks: ref counts, an LRU free queue and the prefix-cache map.

Pure Python (no torch): a block is only an id into every layer's KV tensor
``[2, num_blocks, block_size, num_kv_heads, head_size]``; this module decides
who owns which id.

Block 0 is reserved as the *null block*: it is never handed out, so runners may
pad block tables and slot mappings with 0 (e.g. for padded or captured batches)
without touching anyone's KV. ``num_blocks`` therefore gives ``num_blocks - 1``
usable blocks.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NULL_BLOCK_ID = 0

# Parent hash of a sequence's first block. Fixed (not random) so that hashes are
# reproducible across processes; sha256 makes accidental collisions negligible
# (~2^-128), which is why we pay for it instead of using Python's hash().
ROOT_BLOCK_HASH: bytes = hashlib.sha256(b"kvik-prefix-cache-root").digest()


def hash_block_tokens(
    parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple[object, ...] = ()
) -> bytes:
    """Chained hash of one full block: ``sha256(pickle((parent, tokens, extra_keys)))``.

    The parent hash makes a block's identity depend on the whole prefix, so two
    equal blocks after different prefixes never match. ``extra_keys`` (LoRA id,
    cache salt, ...) must be picklable values with a stable pickle (ints,
    strings, tuples of them).
    """
    parent = ROOT_BLOCK_HASH if parent_hash is None else parent_hash
    payload = pickle.dumps((parent, tuple(token_ids), extra_keys), protocol=4)
    return hashlib.sha256(payload).digest()


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One block of ``block_size`` token slots in every layer's KV cache."""

    block_id: int
    ref_cnt: int = 0  # number of live requests whose block table holds this block
    # Set once the block is full and its KV computed; kept after the block is
    # freed so a later request can still hit it, dropped on eviction.
    block_hash: bytes | None = None

    def __repr__(self) -> str:
        cached = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={cached})"


class BlockPool:
    """Owns every block; allocation takes the least recently freed one.

    Free queue: an ``OrderedDict`` used as an O(1) doubly linked list. The head
    is evicted first. Freed blocks that carry a hash go to the tail (most
    recently used); freed blocks without a hash hold nothing reusable, so they go
    to the head and are reused before any cached block is evicted.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.null_block.ref_cnt = 1  # permanently "in use": never enters the free queue
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[bytes, KVCacheBlock] = {}  # block hash -> the one block holding it

    # ----------------------------------------------------------------- queries
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free, cached-but-unreferenced included)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by at least one request, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_usable_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (head first)."""
        return list(self._free)

    def is_free(self, block: KVCacheBlock) -> bool:
        return block.block_id in self._free

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        """The block holding ``block_hash``'s KV, or None (a cache miss)."""
        return self._cached.get(block_hash)

    # ----------------------------------------------------------------- changes
    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the head of the free queue (ref_cnt 1 each).

        A cached block taken here is evicted: its hash leaves the map. The
        caller checks ``num_free_blocks`` first; asking for more is a bug.
        """
        assert num_blocks <= len(self._free), f"asked for {num_blocks} blocks, {len(self._free)} free"
        out: list[KVCacheBlock] = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            assert block.ref_cnt == 0, block
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits; a hit on a free block leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block, in the order given.

        A block reaching 0 joins the free queue keeping its hash (it can still
        be hit until evicted). Callers pass a sequence's blocks tail first so the
        tail is evicted before the shared-looking head.
        """
        for block in blocks:
            assert block.block_id != NULL_BLOCK_ID, "the null block is never freed"
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[bytes]) -> None:
        """Register full blocks whose KV is computed: ``blocks[i]`` holds ``block_hashes[i]``.

        If another block already holds the same hash (two requests computed the
        same prefix at once), the first one stays the cached copy and this block
        stays unhashed: it is released as a plain block when its owner frees it.
        """
        if not self.enable_caching:
            return
        for block, block_hash in zip(blocks, block_hashes, strict=True):
            if block.block_hash is not None:
                assert block.block_hash == block_hash, "a block's content changed after it was cached"
                continue
            if block_hash in self._cached:
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forget every hash (free and in-use blocks alike); nothing is freed or moved."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            assert self._cached.get(block.block_hash) is block
            del self._cached[block.block_hash]
            block.block_hash = None
