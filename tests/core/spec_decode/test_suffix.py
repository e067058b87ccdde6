"""The suffix proposer: its index against brute force, and drafts from earlier requests' outputs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.request import Request
from kvik.sampling_params import SamplingParams
from kvik.spec_decode.config import SpeculativeConfig
from kvik.spec_decode.suffix import SuffixIndex, SuffixProposer


def _latest_longest(tokens: list[int], lo: int, hi: int) -> tuple[int, int] | None:
    """(continuation start, match length) of the longest tail seen before, at its latest occurrence."""
    for n in range(min(hi, len(tokens)), lo - 1, -1):
        tail = tokens[len(tokens) - n :]
        for nxt in range(len(tokens) - 1, n - 1, -1):
            if tokens[nxt - n : nxt] == tail:
                return nxt, n
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 3), st.integers(0, 4))
def test_index_finds_the_latest_longest_match(tokens, lo, extra) -> None:
    index = SuffixIndex(lo, lo + extra)
    cut = len(tokens) // 2
    index.add(tokens, 0, cut)  # incrementally, as tokens land
    index.add(tokens, cut, len(tokens))
    hit = index.lookup(tokens)
    want = _latest_longest(tokens, lo, lo + extra)
    assert (None if hit is None else (hit[1], hit[2])) == want


def _request(rid: str, prompt: list[int], output: list[int]) -> Request:
    r = Request(rid, prompt, SamplingParams(), max_tokens=64)
    for t in output:
        r.append_output_token(t)
    return r


def test_earlier_outputs_are_proposed_and_evicted() -> None:
    proposer = SuffixProposer(SpeculativeConfig("suffix", 4, suffix_cache_requests=1))
    answer = [50, 51, 52, 53, 54, 55, 56]
    proposer.request_finished(_request("a", [1, 2, 3], answer))
    fresh = _request("b", [9, 9, 8], [50, 51])  # starts the same answer
    assert proposer.propose([fresh], [4]) == [[52, 53]]  # a 2-token match proposes 2
    longer = _request("c", [7], [50, 51, 52, 53])
    assert proposer.propose([longer], [3]) == [[54, 55, 56]]
    proposer.request_finished(_request("d", [4], [60, 61, 62]))  # evicts "a" (cache of one)
    assert proposer.propose([_request("e", [5], [50, 51])], [4]) == [[]]
    assert proposer.propose([_request("f", [5], [60, 61])], [4]) == [[62]]
