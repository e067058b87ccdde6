"""The UTF-8 guard: its automaton is RFC 3629 (Python's strict decoder is the reference), its per-token tables
follow from it for tokens of any length, and a guarded matcher never lets invalid UTF-8 through."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.structured.utf8 import (
    AFTER_E0,
    AFTER_ED,
    AFTER_F0,
    AFTER_F4,
    BOUNDARY,
    NUM_LIVE,
    REJECT,
    TAIL1,
    TAIL2,
    TAIL3,
    Utf8Guard,
    Utf8Table,
    transition_table,
)

# A byte prefix that leaves the decoder in each state.
PREFIX = {BOUNDARY: b"", TAIL1: b"\xc3", TAIL2: b"\xe4", TAIL3: b"\xf1", AFTER_E0: b"\xe0", AFTER_ED: b"\xed",
          AFTER_F0: b"\xf0", AFTER_F4: b"\xf4"}  # fmt: skip
# Every byte where a range in RFC 3629's table starts or ends.
EDGES = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5,
         0xFF]  # fmt: skip


def decoded(data: bytes) -> str:
    """complete (valid UTF-8), partial (a valid prefix cut short) or invalid, per Python's strict decoder."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "partial" if exc.reason == "unexpected end of data" and exc.end == len(data) else "invalid"
    return "complete"


def run(data: bytes, state: int = BOUNDARY) -> int:
    delta = transition_table()
    for byte in data:
        state = int(delta[state, byte])
    return state


def verdict(state: int) -> str:
    return "complete" if state == BOUNDARY else "invalid" if state == REJECT else "partial"


def test_prefixes_reach_their_states() -> None:
    assert {state: run(prefix) for state, prefix in PREFIX.items()} == {s: s for s in range(NUM_LIVE)}


def test_automaton_agrees_with_the_decoder() -> None:
    # Every 1- and 2-byte string, then every lead byte followed by range edges (3 and 4 bytes).
    cases = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    cases += [bytes([a, b, c]) for a in range(256) for b in EDGES for c in EDGES]
    cases += [bytes([a, b, c, d]) for a in range(0xF0, 0xF5) for b in EDGES for c in EDGES for d in EDGES]
    wrong = [data.hex() for data in cases if verdict(run(data)) != decoded(data)]
    assert not wrong, wrong[:10]
    # The one xgrammar gets wrong: surrogates are rejected at their second byte.
    assert run(b"\xed\xa0") == REJECT and run(b"\xed\x9f\xbf") == BOUNDARY


def _vocabulary(seed: int = 0, size: int = 3000) -> list[bytes]:
    """All single bytes, then random tokens: fragments of real UTF-8 text mixed with arbitrary bytes."""
    rng = np.random.default_rng(seed)
    text = "".join(chr(c) for c in rng.integers(0x20, 0x11000, 4000) if not 0xD800 <= c < 0xE000).encode()
    tokens = [bytes([b]) for b in range(256)] + [b""]
    while len(tokens) < size:
        length = int(rng.integers(1, 9))
        if rng.random() < 0.7:
            start = int(rng.integers(0, len(text) - length))
            tokens.append(text[start : start + length])
        else:
            tokens.append(rng.choice(EDGES + list(range(0x80, 0xC0)), length).astype(np.uint8).tobytes())
    return tokens


def _allowed(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def test_the_tables_agree_with_the_decoder_token_by_token() -> None:
    tokens = _vocabulary()
    stop = len(tokens)  # an EOS id past the byte tokens, as in real vocabularies
    vocab = stop + 40  # padded model vocabulary: ids without a token are never allowed
    table = Utf8Table.build([*tokens, b"</s>"], vocab, stop_token_ids=[stop])
    assert table.masks.shape == (NUM_LIVE, (vocab + 31) // 32) and table.masks.dtype == np.int32
    for state, prefix in PREFIX.items():
        mask, following = table.masks[state], table.next_state[state]
        for token, data in enumerate(tokens):
            expected = decoded(prefix + data)
            assert _allowed(mask, token) == (expected != "invalid"), (state, data.hex())
            assert verdict(following[token]) == expected, (state, data.hex())
            if expected == "partial":  # the state carries on exactly like the bytes would
                assert following[token] == run(prefix + data)
        assert _allowed(mask, stop) == (state == BOUNDARY)  # EOS only between characters
        assert not any(_allowed(mask, t) for t in range(stop + 1, vocab))
    assert [t for t in range(vocab) if _allowed(table.stop_mask, t)] == [stop]


class _Free:
    """A grammar that allows every token (the worst case: all bytes are the guard's problem)."""

    def __init__(self, only: list[int] | None = None) -> None:
        self.only, self.accepted = only, []

    def accept_token(self, token_id: int) -> bool:
        if self.only is not None and token_id not in self.only:
            return False
        self.accepted.append(token_id)
        return True

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        bitmask[row] = -1 if self.only is None else 0
        for t in self.only or []:
            bitmask[row, t // 32] |= np.array([1 << (t % 32)], dtype=np.uint32).view(np.int32)[0]

    def is_terminated(self) -> bool:
        return False


TOKENS = _vocabulary(seed=1, size=600)
TABLE = Utf8Table.build(TOKENS, len(TOKENS) + 1, stop_token_ids=[len(TOKENS)])


@settings(max_examples=60, deadline=None)
@given(picks=st.lists(st.integers(0, 2**31), min_size=1, max_size=40))
def test_sampling_from_the_guarded_mask_always_yields_utf8(picks: list[int]) -> None:
    guard = Utf8Guard(_Free(), TABLE)
    bitmask = np.zeros((1, TABLE.masks.shape[1]), dtype=np.int32)
    output = b""
    for pick in picks:
        guard.fill_bitmask(bitmask, 0)
        allowed = [t for t in range(len(TOKENS)) if _allowed(bitmask[0], t)]
        assert allowed  # a free grammar never dead-ends: some token always continues
        token = allowed[pick % len(allowed)]
        assert guard.accept_token(token)
        output += TOKENS[token]
        assert decoded(output) == verdict(guard.state)
    assert decoded(output) != "invalid"


def test_a_token_that_breaks_utf8_is_rejected_and_changes_nothing() -> None:
    free = _Free()
    guard = Utf8Guard(free, TABLE)
    assert guard.accept_token(0xED) and guard.state == AFTER_ED
    assert not guard.accept_token(0xA0)  # a surrogate
    assert not guard.accept_token(len(TOKENS))  # EOS in the middle of a character
    assert not guard.accept_token(10**6)  # not a token id at all
    assert guard.state == AFTER_ED and free.accepted == [0xED]
    assert guard.accept_token(0x9F) and guard.accept_token(0xBF) and guard.state == BOUNDARY


def test_a_grammar_that_only_continues_with_invalid_bytes_gets_the_stop_tokens(caplog) -> None:
    guard = Utf8Guard(_Free(only=[0xED, *range(0xA0, 0xC0)]), TABLE)  # a class of surrogates
    assert guard.accept_token(0xED)
    bitmask = np.zeros((1, TABLE.masks.shape[1]), dtype=np.int32)
    guard.fill_bitmask(bitmask, 0)
    assert [t for t in range(len(TOKENS) + 1) if _allowed(bitmask[0], t)] == [len(TOKENS)]
    assert "only invalid UTF-8" in caplog.text


@pytest.mark.parametrize("vocab", [0, 1, 31, 32, 33])
def test_tiny_and_odd_vocabularies_pack(vocab: int) -> None:
    table = Utf8Table.build([b"a", b"\xc3", b"\xa9"][:vocab], vocab)
    assert table.masks.shape == (NUM_LIVE, (vocab + 31) // 32)
    if vocab >= 3:
        assert [_allowed(table.masks[BOUNDARY], t) for t in range(3)] == [True, True, False]
        assert [_allowed(table.masks[TAIL1], t) for t in range(3)] == [False, False, True]
