"""Incremental detokenization against the tokenizer's own full decode."""

from __future__ import annotations

import pytest
from kvik.engine.detokenizer import IncrementalDetokenizer
from kvik.testing.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(512)


TEXTS = [
    "Hello world! How are you today?",
    "Héllo wörld — naïve café ☕ 日本語",
    "def main():\n    print('hello')\n",
    "0123456789 quick brown fox",
]


@pytest.mark.parametrize("text", TEXTS)
def test_matches_full_decode_token_by_token(tokenizer, text):
    prompt = tokenizer.encode("Once upon a time")
    ids = tokenizer.encode(" " + text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    for t in ids:
        detok.update([t])
        # Never emits a broken character while streaming.
        assert "\ufffd" not in detok.output_text
    detok.flush()
    assert detok.output_text == tokenizer.decode(ids)


def test_multibyte_character_split_across_byte_tokens(tokenizer):
    # Byte-level tokens that together form one character: nothing is emitted until it is complete.
    ids = tokenizer.encode("☕")
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert len(ids) >= 1
    detok = IncrementalDetokenizer(tokenizer, [])
    for t in ids[:-1]:
        detok.update([t])
        assert detok.output_text in ("", tokenizer.decode(ids[:-1]).replace("\ufffd", ""))
    detok.update(ids[-1:])
    assert detok.output_text == "☕", pieces


def test_stop_string_spanning_tokens_is_removed(tokenizer):
    text = " the lazy dog jumps over the fox"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["dog jumps"])
    hit = None
    for t in ids:
        hit = detok.update([t])
        if hit:
            break
    assert hit == "dog jumps"
    assert detok.text(finished=True) == " the lazy "


def test_stop_string_included_when_asked(tokenizer):
    ids = tokenizer.encode(" the lazy dog jumps")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["lazy"], include_stop_str_in_output=True)
    for t in ids:
        if detok.update([t]):
            break
    assert detok.text(finished=True) == " the lazy"


def test_streaming_holds_back_possible_stop_prefix(tokenizer):
    ids = tokenizer.encode(" hello world")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world!"])
    for t in ids:
        assert detok.update([t]) is None
    # " hello world" ends with a prefix of the stop string: unfinished text must not show it yet.
    shown = detok.text(finished=False)
    assert not shown.endswith("world")
    assert detok.text(finished=True) == " hello world"
