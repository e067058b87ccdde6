"""Suffix decoding: continue the longest earlier match of the sequence's tail, in this request or in
earlier requests' outputs.

A :class:`SuffixIndex` maps every n-gram (``suffix_min_match`` <= n <= ``MAX_DEPTH``)
of a token list to where it last occurred, so the longest suffix of the sequence
that occurred before is found with at most ``MAX_DEPTH`` dictionary lookups, and
indexing a new token costs ``MAX_DEPTH`` insertions: no rescans of the history
(the n-gram proposer's cost grows with the sequence, this one's does not). Each
request has its own index (prompt + outputs), built incrementally as tokens land;
a shared index holds the outputs of the last ``suffix_cache_requests`` finished
requests (agentic and repeated workloads re-emit earlier answers). The number of
drafts grows with the match length (a 2-token match proposes 2 tokens, a long one
up to ``num_speculative_tokens``), so weak evidence costs few verify positions.
"""

from __future__ import annotations

from collections import OrderedDict

from kvik.request import Request
from kvik.spec_decode.config import SpeculativeConfig
from kvik.spec_decode.proposer import Proposer

MAX_DEPTH = 12  # the longest tail looked up


class SuffixIndex:
    """n-gram -> (token list, index of the token after its latest occurrence)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.table: dict[tuple[int, ...], tuple[list[int], int]] = {}

    def add(self, tokens: list[int], start: int, end: int) -> None:
        """Index the n-grams of ``tokens`` ending before positions ``start..end-1`` (each with a successor)."""
        table, lo, hi = self.table, self.min_n, self.max_n
        for nxt in range(max(start, lo), end):
            for n in range(lo, min(hi, nxt) + 1):
                table[tuple(tokens[nxt - n : nxt])] = (tokens, nxt)

    def remove(self, tokens: list[int]) -> None:
        """Forget the n-grams whose latest occurrence is in ``tokens`` (the list indexed by :meth:`add`)."""
        table, lo, hi = self.table, self.min_n, self.max_n
        for nxt in range(lo, len(tokens)):
            for n in range(lo, min(hi, nxt) + 1):
                key = tuple(tokens[nxt - n : nxt])
                hit = table.get(key)
                if hit is not None and hit[0] is tokens:
                    del table[key]

    def lookup(self, tokens: list[int]) -> tuple[list[int], int, int] | None:
        """The longest indexed tail of ``tokens``: (source, start of its continuation, match length)."""
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            hit = self.table.get(tuple(tokens[len(tokens) - n :]))
            if hit is not None:
                return hit[0], hit[1], n
        return None


class SuffixProposer(Proposer):
    """Per-request indexes plus a shared one over recent outputs."""

    def __init__(self, config: SpeculativeConfig) -> None:
        super().__init__(config)
        self.min_n = config.suffix_min_match
        self.max_n = max(MAX_DEPTH, self.min_n)
        self._own: dict[str, tuple[SuffixIndex, int]] = {}  # request id -> (index, tokens indexed)
        self._shared = SuffixIndex(self.min_n, self.max_n)
        self._recent: OrderedDict[str, list[int]] = OrderedDict()

    def _index_of(self, request: Request) -> SuffixIndex:
        index, done = self._own.get(request.request_id) or (SuffixIndex(self.min_n, self.max_n), 0)
        tokens = request.all_token_ids
        # The index references the request's own list: positions before ``done`` never change
        # (a stop string truncates only a finishing request).
        index.add(tokens, done, len(tokens))
        self._own[request.request_id] = (index, len(tokens))
        return index

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = []
        for request, k in zip(requests, num_tokens, strict=True):
            if k <= 0:
                drafts.append([])
                continue
            tokens = request.all_token_ids
            own = self._index_of(request).lookup(tokens)
            shared = self._shared.lookup(tokens) if self._recent else None
            best = max((h for h in (own, shared) if h is not None), key=lambda h: h[2], default=None)
            if best is None:
                drafts.append([])
                continue
            source, start, length = best
            drafts.append(source[start : start + min(k, length)])
        return drafts

    def request_finished(self, request: Request) -> None:
        self._own.pop(request.request_id, None)
        limit = self.config.suffix_cache_requests
        if not limit or not request.output_token_ids:
            return
        tokens = list(request.all_token_ids)
        self._recent[request.request_id] = tokens
        self._shared.add(tokens, request.num_prompt_tokens, len(tokens))  # outputs only
        while len(self._recent) > limit:
            _, old = self._recent.popitem(last=False)
            self._shared.remove(old)
