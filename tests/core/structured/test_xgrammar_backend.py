"""The xgrammar backend on the tiny test tokenizer (all 256 byte tokens): what its matchers allow, byte by byte.

xgrammar 0.2.9 accepts ``ED A0..BF xx`` (UTF-16 surrogates, not UTF-8) as one character of a JSON string:
a hypothesis run got a ``maxLength: 4`` string back as ``' s\\ufffd\\ufffd\\ufffdb'``. The backend's matchers
must only ever allow tokens that keep the output valid UTF-8.
"""

from __future__ import annotations

import numpy as np
import pytest

xgrammar = pytest.importorskip("xgrammar")

from kvik.structured.xgrammar_backend import XGrammarBackend  # noqa: E402
from kvik.testing.tiny_models import build_tokenizer  # noqa: E402

VOCAB = 512
STRING = {"type": "object", "properties": {"t": {"type": "string", "maxLength": 4}}, "required": ["t"]}


@pytest.fixture(scope="module")
def backend() -> XGrammarBackend:
    return XGrammarBackend(build_tokenizer(VOCAB), VOCAB, frozenset({2}))


@pytest.fixture(scope="module")
def byte_token(backend: XGrammarBackend) -> dict[int, int]:
    """byte value -> the id of the token that is that single byte."""
    info = xgrammar.TokenizerInfo.from_huggingface(build_tokenizer(VOCAB), vocab_size=VOCAB)
    ids = {data[0]: token for token, data in enumerate(info.decoded_vocab) if len(data) == 1}
    assert len(ids) == 256
    return ids


def allowed_bytes(backend: XGrammarBackend, matcher, byte_token: dict[int, int]) -> list[int]:
    bitmask = backend.allocate_bitmask(1)
    matcher.fill_bitmask(bitmask, 0)
    words = bitmask[0].view(np.uint32)
    return [b for b, t in byte_token.items() if (int(words[t // 32]) >> (t % 32)) & 1]


def matcher_after(backend: XGrammarBackend, compiled, data: bytes, byte_token: dict[int, int]):
    matcher = backend.new_matcher(compiled)
    for b in data:
        assert matcher.accept_token(byte_token[b]), data
    return matcher


def test_the_failing_example_cannot_happen(backend, byte_token) -> None:
    # The saved hypothesis case: ' s' then ED A0 80 inside a maxLength 4 string.
    matcher = matcher_after(backend, backend.compile("json", STRING), b'{"t": " s\xed', byte_token)
    after_ed = allowed_bytes(backend, matcher, byte_token)
    assert after_ed == list(range(0x80, 0xA0))  # not A0..BF: those encode U+D800..U+DFFF
    assert not matcher.accept_token(byte_token[0xA0])
    for b in b'\x9f\xbfb"}':  # U+D7FF, then the 4th character and the end
        assert matcher.accept_token(byte_token[b])
    assert matcher.accept_token(2) and matcher.is_terminated()


@pytest.mark.parametrize(
    "kind,spec,prefix",
    [
        ("json", STRING, b'{"t": "'),  # maxLength strings: [^"\\\r\n]{0,n} plus kvik's control-character fix
        ("json", {"type": "object", "properties": {"t": {"type": "string"}}}, b'{"t": "'),
        ("regex", ".+", b""),
        ("grammar", "root ::= [^a]+", b""),
    ],
    ids=["bounded-string", "string", "regex-dot", "ebnf-negated-class"],
)
def test_no_allowed_byte_ever_breaks_utf8(backend, byte_token, kind, spec, prefix) -> None:
    """Walk every lead byte the grammar allows, then every second byte: the third must keep it UTF-8.

    RFC 3629's exceptions (overlong forms, surrogates, > U+10FFFF) are all decided by the first two bytes.
    """
    compiled = backend.compile(kind, spec)
    invalid, partial = [], [b""]
    while partial:
        data = partial.pop()
        for b in allowed_bytes(backend, matcher_after(backend, compiled, prefix + data, byte_token), byte_token):
            longer = data + bytes([b])
            try:
                longer.decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.reason != "unexpected end of data":
                    invalid.append(longer.hex())
                elif len(longer) < 3:
                    partial.append(longer)
    assert not invalid, invalid[:8]
