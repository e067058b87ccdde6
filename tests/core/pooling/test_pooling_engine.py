"""Pooling models through the engine: kvik's vectors against sentence-transformers / transformers (fp32),
batched = unbatched = chunked, the pooler setup read from the checkpoint, and bad input refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik import LLM
from kvik.pooling import PoolingParams
from kvik.pooling.finish import finish_pooled
from kvik.testing.tiny_models import make_tiny_model
from kvik.testing.tiny_pooling import make_tiny_classifier, make_tiny_embedder

TEXTS = [
    "hello world",
    "def main():\n    print('hello')",
    "System: you are a helpful assistant. User: tell me a story about a cat and a dog.",
    "a",
]
ENGINE = dict(dtype="float32", device="cpu", num_threads=1, max_model_len=256)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pooling")
    return {
        "qwen3-last": make_tiny_embedder(root / "qwen3-last", "qwen3", "last", head_dim=16),
        "llama-mean": make_tiny_embedder(root / "llama-mean", "llama", "mean", normalize=False),
        "qwen2-cls": make_tiny_embedder(root / "qwen2-cls", "qwen2", "cls"),
        "reranker": make_tiny_classifier(root / "reranker", "qwen2", num_labels=1),
        "classifier": make_tiny_classifier(root / "classifier", "llama", num_labels=3),
        "causal": make_tiny_model(root / "causal", "qwen3", head_dim=16),
    }


@pytest.fixture(scope="module")
def embedders(models: dict[str, Path]) -> Iterator[dict[str, LLM]]:
    yield {name: LLM(str(models[name]), **ENGINE) for name in ("qwen3-last", "llama-mean", "qwen2-cls")}


@pytest.mark.parametrize("name", ["qwen3-last", "llama-mean", "qwen2-cls"])
def test_embeddings_match_sentence_transformers(models: dict[str, Path], embedders: dict[str, LLM], name: str) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(models[name]), device="cpu").encode(TEXTS, batch_size=4)
    got = np.array([o.outputs.embedding for o in embedders[name].embed(TEXTS)])
    assert got.shape == reference.shape
    assert cosines(got, reference).min() >= 0.9999
    if name == "llama-mean":  # no Normalize module: raw mean, magnitude included
        np.testing.assert_allclose(got, reference, rtol=1e-3, atol=1e-4)
    else:
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_matryoshka_dimensions_truncate_then_normalize(models: dict[str, Path], embedders: dict[str, LLM]) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(models["qwen3-last"]), device="cpu", truncate_dim=16).encode(TEXTS)
    got = np.array([o.outputs.embedding for o in embedders["qwen3-last"].embed(TEXTS, dimensions=16)])
    assert got.shape == (len(TEXTS), 16)
    assert cosines(got, reference).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_texts_tokenized_in_one_call_match_one_by_one(embedders: dict[str, LLM]) -> None:
    engine = embedders["qwen2-cls"].llm_engine
    inputs = [*TEXTS, [5, 6, 7]]  # text and token ids mixed
    params = [PoolingParams()] * len(inputs)
    together = engine.prepare_pooling_requests([f"t{i}" for i in range(len(inputs))], inputs, params)
    alone = [engine.prepare_pooling_request(f"a{i}", p, PoolingParams()) for i, p in enumerate(inputs)]
    assert [r.prompt_token_ids for r in together] == [r.prompt_token_ids for r in alone]
    assert [r.prompt for r in together] == [*TEXTS, None]


@pytest.mark.parametrize("name", ["qwen3-last", "llama-mean", "qwen2-cls"])
def test_batched_equals_unbatched_and_chunked(models: dict[str, Path], embedders: dict[str, LLM], name: str) -> None:
    texts = [*TEXTS, TEXTS[2] * 4]  # the last is long enough to be prefilled in chunks below
    batched = np.array([o.outputs.embedding for o in embedders[name].embed(texts)])
    single = np.array([embedders[name].embed(t)[0].outputs.embedding for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # Chunked prefill (a state kept between steps), with async scheduling (the next step scheduled early).
    chunked = LLM(
        str(models[name]), **ENGINE, max_num_batched_tokens=32, long_prefill_token_threshold=16, async_scheduling=True
    )
    assert chunked.llm_engine.async_scheduling
    in_chunks = np.array([o.outputs.embedding for o in chunked.embed(texts)])
    np.testing.assert_allclose(in_chunks, batched, atol=1e-5)
    # Repeating a prompt (prefix cache warm) gives the same vector: MEAN/CLS skip the cache.
    again = np.array([o.outputs.embedding for o in chunked.embed(texts)])
    np.testing.assert_allclose(again, batched, atol=1e-5)


def test_classifier_and_reranker_match_transformers(models: dict[str, Path]) -> None:
    import transformers

    clf = LLM(str(models["classifier"]), **ENGINE)
    tok = clf.get_tokenizer()
    ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(models["classifier"]).eval()
    probs = np.array([o.outputs.probs for o in clf.classify(TEXTS)])
    with torch.no_grad():
        ref = [ref_model(torch.tensor([tok.encode(t)])).logits.softmax(-1)[0].numpy() for t in TEXTS]
    np.testing.assert_allclose(probs, np.array(ref), atol=1e-5)

    reranker = LLM(str(models["reranker"]), **ENGINE)
    query, docs = "tell me a story", ["a story about a cat", "def main(): pass", "hello"]
    scores = [o.outputs.score for o in reranker.score(query, docs)]
    ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(models["reranker"]).eval()
    with torch.no_grad():
        ref_scores = [
            float(ref_model(**tok(text=query, text_pair=d, return_tensors="pt")).logits[0, 0].sigmoid()) for d in docs
        ]
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_causal_checkpoint_as_embedder_and_scoring_by_cosine(models: dict[str, Path]) -> None:
    import transformers

    llm = LLM(str(models["causal"]), runner="pooling", **ENGINE)
    tok = llm.get_tokenizer()
    hf = transformers.AutoModel.from_pretrained(models["causal"]).eval()  # the body of the causal LM
    got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    with torch.no_grad():
        last = np.array([hf(torch.tensor([tok.encode(t)])).last_hidden_state[0, -1].numpy() for t in TEXTS])
    assert cosines(got, last).min() >= 0.9999
    scores = [o.outputs.score for o in llm.score(TEXTS[0], TEXTS[1:])]
    np.testing.assert_allclose(scores, [float(got[0] @ v) for v in got[1:]], atol=1e-5)


def test_texts_added_in_chunks_give_the_same_vectors(
    embedders: dict[str, LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLM.encode tokenizes a few texts at a time while earlier steps run; a bad text in a later chunk
    still fails the whole call and leaves nothing running."""
    import kvik.entrypoints.llm as llm_module

    llm = embedders["llama-mean"]
    texts = [*TEXTS, *TEXTS[::-1], TEXTS[2] * 3]
    whole = np.array([o.outputs.embedding for o in llm.embed(texts)])
    monkeypatch.setattr(llm_module, "POOLING_CHUNK", 2)
    chunked = np.array([o.outputs.embedding for o in llm.embed(texts)])
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    with pytest.raises(ValueError, match="max_model_len is 256"):
        llm.embed([*TEXTS, [5] * 300])  # in the third chunk
    assert not llm.llm_engine.has_unfinished_requests()
    assert not [t for t in threading.enumerate() if t.name.startswith("kvik-tokenize")]  # its thread is gone


def test_bad_input_is_refused_with_the_reason(models: dict[str, Path], embedders: dict[str, LLM]) -> None:
    llm = embedders["qwen3-last"]
    with pytest.raises(ValueError, match="runner='pooling'"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="empty"):
        llm.embed([[]])
    with pytest.raises(ValueError, match="max_model_len is 256"):
        llm.embed([[5] * 300])
    trimmed = llm.embed([[5] * 300], truncate_prompt_tokens=200)[0]
    assert len(trimmed.prompt_token_ids) == 200
    with pytest.raises(ValueError, match="dimensions=65 exceeds"):
        llm.embed("x", dimensions=65)
    with pytest.raises(ValueError, match="cannot serve 'classify'"):
        llm.classify("x")
    generator = LLM(str(models["causal"]), **ENGINE)
    with pytest.raises(ValueError, match="generation model"):
        generator.embed("hello")
    with pytest.raises(ValueError, match="cannot generate"):
        LLM(str(models["reranker"]), runner="generate", **ENGINE)
    with pytest.raises(ValueError):
        PoolingParams(dimensions=0)


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=32),
    dims=st.integers(1, 40),
    normalize=st.booleans(),
)
def test_finish_pooled_truncates_then_normalizes(raw: list[float], dims: int, normalize: bool) -> None:
    vector = np.array(raw, dtype=np.float32)
    out = np.array(finish_pooled(vector, PoolingParams(dimensions=dims, normalize=normalize), default_normalize=False))
    kept = vector[:dims].astype(np.float64)
    assert out.shape == kept.shape
    norm = np.linalg.norm(kept)
    expected = kept / max(norm, 1e-12) if normalize else kept
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(logits=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=8))
def test_classification_probabilities(logits: list[float]) -> None:
    probs = finish_pooled(np.array(logits, dtype=np.float32), PoolingParams(task="classify"), default_normalize=True)
    assert len(probs) == len(logits) and all(0 <= p <= 1 for p in probs)
    if len(logits) > 1:
        assert sum(probs) == pytest.approx(1.0)
        assert probs[int(np.argmax(np.array(logits, dtype=np.float32)))] == max(probs)  # order kept


OPTIONS = [PoolingParams(), PoolingParams(dimensions=3), PoolingParams(normalize=False), PoolingParams(task="classify")]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.floats(-100, 100, allow_nan=False), min_size=6, max_size=6), min_size=1, max_size=6),
    options=st.lists(st.sampled_from(OPTIONS), min_size=6, max_size=6),
    shared=st.booleans(),
)
def test_a_steps_rows_finish_as_each_alone(rows: list[list[float]], options: list[PoolingParams], shared: bool) -> None:
    """A step's vectors are finished together when they share options: each is bit-identical to its
    vector finished alone (its batch does not change it), with mixed options too."""
    from kvik.pooling.finish import finish_pooled_rows

    raw = [np.array(r, dtype=np.float32) for r in rows]
    params = [options[0]] * len(raw) if shared else options[: len(raw)]
    together = finish_pooled_rows(raw, params, default_normalize=True)
    assert together == [finish_pooled(r, p, default_normalize=True) for r, p in zip(raw, params, strict=True)]
