"""kvik.engine.batch_tokenize: the direct Rust call gives the wrapper's ids, and steps aside when it would not."""

from __future__ import annotations

import pytest
from kvik.engine.batch_tokenize import batch_token_ids
from kvik.testing.tiny_encoders import make_tiny_encoder
from transformers import AutoTokenizer

TEXTS = [
    "hello world",
    "a",
    "the quick brown fox jumps over the lazy dog " * 30,
    "naïve café, 東京 🙂",
    "  spaced  out  ",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> dict[str, object]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("tok")
    paths = {"llama": tiny_model_dir("llama"), "bert": make_tiny_encoder(root / "bert", "bert", "mean", True),
             "xlm-roberta": make_tiny_encoder(root / "xlmr", "xlm-roberta", "cls", False)}  # fmt: skip
    return {name: AutoTokenizer.from_pretrained(str(path)) for name, path in paths.items()}


@pytest.mark.parametrize("name", ["llama", "bert", "xlm-roberta"])
def test_the_direct_call_gives_the_wrappers_ids(tokenizers, name: str) -> None:  # type: ignore[no-untyped-def]
    tokenizer = tokenizers[name]
    assert tokenizer._tokenizer.encode_batch_fast is not None  # the direct path is the one under test
    assert batch_token_ids(tokenizer, TEXTS) == [list(ids) for ids in tokenizer(TEXTS)["input_ids"]]
    assert batch_token_ids(tokenizer, []) == []


def test_truncation_left_on_the_backend_sends_the_call_through_the_wrapper(tokenizers) -> None:  # type: ignore[no-untyped-def]
    tokenizer = tokenizers["bert"]
    tokenizer._tokenizer.enable_truncation(8)  # as a caller's earlier truncation=True call may leave it
    try:
        got = batch_token_ids(tokenizer, TEXTS)
    finally:
        tokenizer._tokenizer.no_truncation()
    assert got == [list(ids) for ids in tokenizer(TEXTS)["input_ids"]] and max(map(len, got)) > 8


def test_a_tokenizer_class_from_elsewhere_takes_the_wrapper(tokenizers, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tokenizer = tokenizers["llama"]
    custom = type("RemoteTokenizer", (type(tokenizer),), {"__module__": "remote_code.tokenization"})
    calls: list[int] = []
    monkeypatch.setattr(
        custom, "__call__", lambda self, texts: calls.append(len(texts)) or {"input_ids": [[7]] * len(texts)}
    )
    tokenizer.__class__ = custom
    try:
        assert batch_token_ids(tokenizer, TEXTS[:2]) == [[7], [7]] and calls == [2]
    finally:
        tokenizer.__class__ = custom.__mro__[1]
