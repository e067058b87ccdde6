"""N-gram (prompt lookup) proposer: copy what followed the last time the sequence's tail occurred.

For the longest ``n`` in ``[prompt_lookup_min, prompt_lookup_max]`` whose last ``n``
tokens occurred earlier in the request (prompt or output), the tokens after the
earliest such occurrence are the drafts. Matching is vectorised with numpy: one
windowed comparison per ``n``, no Python loop over positions.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kvik.request import Request
from kvik.spec_decode.proposer import Proposer


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens following the earliest earlier occurrence of the longest matching tail."""
    length = tokens.shape[0]
    if k <= 0:
        return tokens[:0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting at 0 .. length - n - 1: every occurrence except the tail itself.
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return tokens[start : start + k]
    return tokens[:0]


class NgramProposer(Proposer):
    """Prompt lookup decoding over each request's own tokens."""

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        lo, hi = self.config.prompt_lookup_min, self.config.prompt_lookup_max
        return [
            ngram_lookup(np.asarray(r.all_token_ids, dtype=np.int64), lo, hi, k).tolist() if k > 0 else []
            for r, k in zip(requests, num_tokens, strict=True)
        ]
