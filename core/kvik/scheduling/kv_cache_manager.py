"""Per-request block tables on top of the block pool, with automatic prefix caching.

A request's block table covers its computed tokens plus the tokens scheduled
this step. Full blocks are identified by a chained hash of their tokens (see
:func:`~kvik.scheduling.block_pool.hash_block_tokens`); a new request whose
prompt starts with cached blocks reuses them instead of recomputing their KV.

A block enters the cache as soon as the step that computes its KV is final
(:meth:`KVCacheManager.cache_blocks`, called by the scheduler). A request
admitted later in the same step may then share it: runners write a whole step's
K/V before any attention reads the cache (``AttentionBackend.forward``'s
contract), so concurrent requests with a common prefix (and the ``n`` samples of
one prompt) compute that prefix once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from kvik.request import Request
from kvik.scheduling.block_pool import NULL_BLOCK_ID, BlockPool, KVCacheBlock, hash_block_tokens


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups in tokens, counted when a request is admitted (a resumed preempted one counts again)."""

    queries: int = 0  # tokens looked up (the request's whole token count at admission)
    hits: int = 0  # of those, tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_blocks_per_request(max_model_len: int, block_size: int, sliding_window: int | None, step_tokens: int) -> int:
    """The most blocks one request ever holds at once in one KV-cache group: its whole length, or in a group
    whose layers slide with ``sliding_window``, the blocks a step can see (the window behind its first query,
    one block of margin) plus the blocks its ``step_tokens`` new tokens fill, whichever is less."""
    whole = cdiv(max_model_len, block_size)
    if sliding_window is None:
        return whole
    # Kept from block (start - window + 1) // bs - 1 on (first_needed_block) up to cdiv(start + n, bs), n <= step_tokens.
    return min(whole, (sliding_window + step_tokens - 3) // block_size + 3)


def first_needed_position(start: int, window: int, block_size: int) -> int:
    """The first block position a step whose queries start at ``start`` reads under ``window`` (possibly
    negative: none is passed yet). One block of margin before the window's edge: kernels read whole KV tiles,
    and the masked part of a tile straddling the edge then comes from the null block (finite values, weight 0)."""
    return (start - window + 1) // block_size - 1


def blocks_held_at_most(
    max_model_len: int, block_size: int, group_windows: Sequence[int | None], step_tokens: int
) -> int:
    """The most blocks one request ever holds at once, over all its KV-cache groups (one window per group:
    :mod:`kvik.scheduling.kv_cache_groups`). The memory planner sizes the pool from this."""
    return sum(max_blocks_per_request(max_model_len, block_size, w, step_tokens) for w in group_windows)


def longest_fitting_request(
    num_blocks: int, block_size: int, group_windows: Sequence[int | None], step_tokens: int, limit: int
) -> int:
    """The most tokens (at most ``limit``) one request may reach holding no more than ``num_blocks`` blocks."""
    held = functools.partial(
        blocks_held_at_most, block_size=block_size, group_windows=group_windows, step_tokens=step_tokens
    )
    if held(limit) <= num_blocks:
        return limit
    low, high = 0, limit  # held() grows with the length: bisect for the last length that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if held(mid) <= num_blocks else (low, mid - 1)
    return low


def group_hash(block_hash: bytes, group: int) -> bytes:
    """The prefix-cache key of a block of group ``group`` holding the tokens ``block_hash`` names: each group
    keeps its own copy of a position's K/V (its own layers'), so each needs its own key."""
    return block_hash if group == 0 else block_hash + group.to_bytes(2, "little")


class KVCacheManager:
    """Allocates, caches and frees the KV blocks of each request.

    A request's table holds ``num_groups`` blocks per position of ``block_size`` tokens, interleaved
    (position ``i``, group ``g`` at index ``i * num_groups + g``; one group: a plain table). Blocks a group's
    window has passed are released and the null block stands in for them.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        group_windows: Sequence[int | None] = (None,),
    ):
        if not group_windows:
            raise ValueError("group_windows needs one window (or None) per KV-cache group")
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        # Per KV-cache group, the window its layers slide with (None: they see the whole context). Blocks behind
        # a window are released as requests advance, and a prefix hit needs only the blocks each window shows.
        self.group_windows = tuple(group_windows)
        self.num_groups = len(self.group_windows)
        self.windowed = any(w is not None for w in self.group_windows)
        self._windowed_groups = [(g, w) for g, w in enumerate(self.group_windows) if w is not None]
        self.pool = BlockPool(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.prefix_cache_stats = PrefixCacheStats()
        self._blocks: dict[str, list[KVCacheBlock]] = {}  # request id -> block table (groups interleaved)
        self._block_ids: dict[str, list[int]] = {}  # request id -> its table's block ids (kept for speed)
        self._hashes: dict[str, list[bytes]] = {}  # request id -> hash of each full block of its tokens
        self._num_cached: dict[str, int] = {}  # request id -> leading positions already registered in the cache
        # request id -> per group, the leading positions released behind its window (null blocks stand in)
        self._num_released: dict[str, list[int]] = {}

    # ----------------------------------------------------------------- queries
    @property
    def usage(self) -> float:
        """Fraction of usable KV blocks held by requests, in [0, 1]."""
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def block_tables(self) -> Mapping[str, list[KVCacheBlock]]:
        """Read-only view: request id -> block table, for every request holding blocks."""
        return MappingProxyType(self._blocks)

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        """The request's block table (empty if it holds none; groups interleaved). Do not mutate."""
        return self._blocks.get(request_id, [])

    def get_block_ids(self, request: Request) -> list[int]:
        """Block ids of the request's table, in position order (position i holds tokens [i*bs, (i+1)*bs);
        with several groups, its ``num_groups`` ids come one after the other)."""
        return list(self._block_ids.get(request.request_id, ()))

    def new_block_ids(self, request_ids: list[str], sent: dict[str, int]) -> list[list[int]]:
        """Per request, its block ids past the ``sent[request_id]`` already sent (all of them when
        absent), with ``sent`` advanced: the block-table deltas of one step, in one call."""
        tables = self._block_ids
        out: list[list[int]] = []
        for rid in request_ids:
            ids = tables.get(rid, ())
            start = sent.get(rid)
            if start is None:
                new = list(ids)
            elif len(ids) > start:
                new = list(ids[start:])
            else:
                out.append([])  # a decode step between block boundaries: nothing new (the hot case)
                continue
            sent[rid] = len(ids)
            out.append(new)
        return out

    def cache_scheduled(self, requests: list[Request], num_new_tokens: list[int]) -> None:
        """:meth:`cache_blocks` over each request's known tokens once its ``num_new_tokens`` are computed,
        skipping in one comparison the requests that fill no block (most decodes)."""
        if not self.enable_prefix_caching:
            return
        num_cached = self._num_cached
        bs = self.block_size
        for request, num_new in zip(requests, num_new_tokens, strict=True):
            start = num_cached.get(request.request_id)
            n = min(request.num_computed_tokens + num_new, len(request.all_token_ids))
            if start is not None and n // bs > start:
                self.cache_blocks(request, n)

    def allocate_decode_slots(self, requests: list[Request]) -> list[int] | None:
        """:meth:`allocate_slots` of one token for each request, then :meth:`cache_scheduled` of it, in one
        pass in which only the requests crossing into a new block position, or filling one, reach per-request
        code. Returns the indices of the requests given new blocks, or None, changing nothing, when the pool
        cannot give all of them theirs (the caller's per-request loop then decides whom to preempt). Each
        request holds a table already; the pool has no windows."""
        bs, num_groups, tables, cached = self.block_size, self.num_groups, self._blocks, self._num_cached
        caching = self.enable_prefix_caching
        crossing: list[int] = []
        filling: list[tuple[Request, int]] = []
        missing = 0
        for i, request in enumerate(requests):
            computed = request.num_computed_tokens
            need = (computed // bs + 1) * num_groups - len(tables[request.request_id])
            if need > 0:
                crossing.append(i)
                missing += need
            if caching:
                end = computed + 1
                known = len(request.all_token_ids)
                if end > known:
                    end = known  # a token still being sampled: its block is published once it is known
                if end // bs > cached[request.request_id]:
                    filling.append((request, end))
        if missing > self.pool.num_free_blocks:
            return None
        for i in crossing:
            self.allocate_slots(requests[i], 1)
        for request, end in filling:
            self.cache_blocks(request, end)
        return crossing

    def get_new_block_ids(self, request: Request, start: int) -> list[int]:
        """Block ids of the request's table from index ``start`` on (a block-table delta)."""
        ids = self._block_ids.get(request.request_id, ())
        return list(ids[start:]) if start else list(ids)

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks a table covering ``num_tokens`` tokens holds before any is released (every group's)."""
        return cdiv(num_tokens, self.block_size) * self.num_groups

    def block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full blocks, extended incrementally as its tokens grow."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs], request.cache_extra_keys))
        return hashes

    # ----------------------------------------------------------------- changes
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest run of cached full blocks at the start of a new request's tokens.

        Returns ``(blocks, num_computed_tokens)`` with ``num_computed_tokens ==
        len(blocks) // num_groups * block_size`` (``blocks`` interleaved like a table). Never covers the last
        token: at least one token must be computed to produce logits, so the hit is capped at
        ``(num_tokens - 1) // block_size`` positions. Takes no references (pass the
        blocks to :meth:`allocate_slots`). Requests asking for prompt logprobs
        skip the cache (they need logits at every prompt position).
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        pooling = request.pooling_params
        if pooling is not None and pooling.pooling_type is not None and pooling.pooling_type.reads_every_token:
            return [], 0  # mean / CLS pooling reads every token's state: compute them all
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        lookup = self.pool.get_cached_block
        if not self.windowed and self.num_groups == 1:
            hits: list[KVCacheBlock] = []
            for block_hash in self.block_hashes(request)[:max_hit_blocks]:
                block = lookup(block_hash)
                if block is None:
                    break
                hits.append(block)
            return hits, len(hits) * self.block_size
        # A hit of n positions needs, in each group, the blocks first_needed_block(n * bs, group) .. n - 1
        # cached (the chained hash of each proves the tokens before it); the null block stands in for the
        # ones before. The longest such n wins, though blocks before a window's edge were evicted.
        bs, groups = self.block_size, range(self.num_groups)
        found: list[list[KVCacheBlock | None]] = []  # per position, per group
        runs = [0] * self.num_groups  # per group: cached blocks in a row ending at the current position
        best = 0
        for i, block_hash in enumerate(self.block_hashes(request)[:max_hit_blocks]):
            row = [lookup(group_hash(block_hash, g)) for g in groups]
            found.append(row)
            fits = True
            for g in groups:
                runs[g] = runs[g] + 1 if row[g] is not None else 0
                if runs[g] < i + 1 - self.first_needed_block((i + 1) * bs, g):
                    fits = False
                    if self.group_windows[g] is None:  # a global group missed: no longer hit can exist
                        break
            if fits:
                best = i + 1
            elif any(runs[g] == 0 and self.group_windows[g] is None for g in groups):
                break
        null = self.pool.null_block
        firsts = [self.first_needed_block(best * bs, g) for g in groups]
        out: list[KVCacheBlock] = []
        for i in range(best):
            for g in groups:
                block = found[i][g]
                out.append(null if i < firsts[g] or block is None else block)
        return out, best * bs

    def first_needed_block(self, start: int, group: int = 0) -> int:
        """The first block position a step whose queries start at position ``start`` (and every later step)
        reads in ``group``: 0 for a group without a window (:func:`first_needed_position`)."""
        window = self.group_windows[group]
        if window is None:
            return 0
        return max(0, first_needed_position(start, window, self.block_size))

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVCacheBlock] | None = None
    ) -> list[KVCacheBlock] | None:
        """Grow the request's table to hold ``num_new_tokens`` more tokens.

        ``new_computed_blocks`` are prefix-cache hits from :meth:`get_computed_blocks`
        (only for a request holding no blocks yet); they sit before the new tokens,
        so the table must cover ``request.num_computed_tokens + len(hits) // num_groups *
        block_size + num_new_tokens`` tokens. Returns the newly allocated blocks
        (hits excluded), or None, changing nothing, when the pool lacks blocks.
        """
        hits = new_computed_blocks or []
        table = self._blocks.get(request.request_id)
        num_groups = self.num_groups
        if table is None:
            table = []
        elif not hits and self.num_blocks_needed(request.num_computed_tokens + num_new_tokens) <= len(table):
            return []  # the fast path (a decode step): usually no new block is needed
        assert not hits or not table, "prefix hits only apply to a request that holds no blocks"
        num_hit_positions = len(hits) // num_groups
        num_computed = request.num_computed_tokens + num_hit_positions * self.block_size
        num_needed = max(self.num_blocks_needed(num_computed + num_new_tokens) - len(table) - len(hits), 0)
        # Hits on unreferenced cached blocks come out of the free queue too.
        num_hits_from_free = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed + num_hits_from_free > self.pool.num_free_blocks:
            return None

        rid = request.request_id
        if rid not in self._blocks:  # admission: count the lookup once
            if self.enable_prefix_caching:
                self.prefix_cache_stats.queries += request.num_tokens
                self.prefix_cache_stats.hits += num_hit_positions * self.block_size
            self._blocks[rid] = table
            self._block_ids[rid] = []
            self._num_cached[rid] = num_hit_positions
        null = self.pool.null_block
        if self.windowed and hits:  # a windowed hit's leading blocks, which its window no longer shows
            released = []
            for g in range(num_groups):
                n = 0
                while n < num_hit_positions and hits[n * num_groups + g] is null:
                    n += 1
                released.append(n)
            if any(released):
                self._num_released[rid] = released
            self.pool.touch([b for b in hits if b is not null])
        else:
            self.pool.touch(hits)
        new_blocks = self.pool.get_new_blocks(num_needed)
        ids = self._block_ids[rid]
        for blocks in (hits, new_blocks):
            table.extend(blocks)
            ids.extend(b.block_id for b in blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's full blocks among its first ``num_computed_tokens`` tokens.

        Call it once those tokens' KV is written or scheduled in a step that can no
        longer change (a block registered for a step that is then dropped would
        serve KV that was never written).
        """
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self._blocks.get(rid)
        if table is None:
            return
        num_groups = self.num_groups
        start = self._num_cached[rid]
        num_full = min(num_computed_tokens // self.block_size, len(table) // num_groups)
        if num_full <= start:
            return
        hashes = self.block_hashes(request)
        if num_groups == 1 and rid not in self._num_released:
            self.pool.cache_full_blocks(table[start:num_full], hashes[start:num_full])
        else:  # blocks released behind a window before they were registered stay unregistered
            null = self.pool.null_block
            blocks, keys = [], []
            for i in range(start, num_full):
                for g in range(num_groups):
                    block = table[i * num_groups + g]
                    if block is not null:
                        blocks.append(block)
                        keys.append(group_hash(hashes[i], g))
            self.pool.cache_full_blocks(blocks, keys)
        self._num_cached[rid] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first (the tail is evicted before a shareable head)."""
        table = self._blocks.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        if self._num_released.pop(request.request_id, None) is None:
            self.pool.free_blocks(reversed(table))
        else:
            null = self.pool.null_block
            self.pool.free_blocks([b for b in reversed(table) if b is not null])

    def release_behind_window(self, request: Request) -> bool:
        """Release, in each group with a window, the blocks no query of the request's next step (or any later
        one) reads: those before ``first_needed_block(num_computed_tokens, group)``. A step still in flight
        reads its blocks before any later step can write a released one (steps run in order on the device),
        and a verify step's rejected drafts roll back to no earlier than that step's start. Returns whether
        any block was released."""
        rid, start, bs = request.request_id, request.num_computed_tokens, self.block_size
        done = self._num_released.get(rid)
        released = False
        for g, window in self._windowed_groups:  # called for every scheduled request: the common case is cheap
            first = first_needed_position(start, window, bs)
            if first > (done[g] if done is not None else 0) and self.release_leading_blocks(rid, first, g):
                released = True
                done = self._num_released[rid]
        return released

    def release_leading_blocks(self, request_id: str, num_blocks: int, group: int = 0) -> bool:
        """Release the request's first ``num_blocks`` block positions in ``group``, which no attention of its
        will read again (a sliding window has passed them): the table keeps its length, the null block
        standing in for each. Their KV stays in the prefix cache until evicted. Returns whether any block
        was released."""
        table = self._blocks.get(request_id)
        if table is None:
            return False
        num_groups = self.num_groups
        released_per_group = self._num_released.get(request_id)
        done = released_per_group[group] if released_per_group is not None else 0
        n = min(num_blocks, len(table) // num_groups)
        if n <= done:
            return False
        if released_per_group is None:
            released_per_group = self._num_released[request_id] = [0] * num_groups
        null = self.pool.null_block
        ids = self._block_ids[request_id]
        released = []
        for i in range(done * num_groups + group, n * num_groups, num_groups):
            if table[i] is not null:
                released.append(table[i])
            table[i] = null
            ids[i] = NULL_BLOCK_ID
        released_per_group[group] = n
        self.pool.free_blocks(reversed(released))
        return bool(released)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after weights change); running requests keep their blocks."""
        self.pool.reset_prefix_cache()
