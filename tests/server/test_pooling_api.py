"""The pooling routes in-process: /v1/embeddings through the openai client (float and base64),
/v1/rerank, /score, /classify, and 400s naming the problem."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from kvik import LLM
from kvik.testing.tiny_pooling import make_tiny_classifier, make_tiny_embedder
from server_harness import InProcessServer

ENGINE = dict(dtype="float32", max_model_len=128)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pooling_api")
    return {
        "embedder": make_tiny_embedder(root / "embedder", "qwen3", "last", head_dim=16),
        "reranker": make_tiny_classifier(root / "reranker", "qwen2", num_labels=1),
    }


@pytest.fixture(scope="module")
def embed_server(checkpoints: dict[str, Path]) -> Iterator[InProcessServer]:
    server = InProcessServer(checkpoints["embedder"], **ENGINE)
    yield server
    server.close()


@pytest.fixture(scope="module")
def rerank_server(checkpoints: dict[str, Path]) -> Iterator[InProcessServer]:
    server = InProcessServer(checkpoints["reranker"], **ENGINE)
    yield server
    server.close()


def test_embeddings_through_the_openai_client(checkpoints: dict[str, Path], embed_server: InProcessServer) -> None:
    import openai

    texts = ["hello world", "tell me a story", "a"]
    reference = np.array([o.outputs.embedding for o in LLM(str(checkpoints["embedder"]), **ENGINE).embed(texts)])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=embed_server.app), base_url="http://kvik/v1")
    client = openai.AsyncOpenAI(base_url="http://kvik/v1", api_key="none", http_client=http)
    try:
        floats = embed_server.run(client.embeddings.create(model="tiny", input=texts, encoding_format="float"))
        packed = embed_server.run(client.embeddings.create(model="tiny", input=texts, encoding_format="base64"))
        short = embed_server.run(client.embeddings.create(model="tiny", input=texts[0], dimensions=8))
        ids = embed_server.run(client.embeddings.create(model="tiny", input=[[5, 6, 7], [8, 9]]))
    finally:
        embed_server.run(http.aclose())
    assert [d.index for d in floats.data] == [0, 1, 2]
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), reference, atol=1e-5)
    # An explicit encoding_format="base64" gives the strings as sent: little-endian float32.
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data])
    np.testing.assert_allclose(decoded, reference, atol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    assert len(short.data[0].embedding) == 8
    assert np.linalg.norm(short.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert ids.usage.prompt_tokens == 5 and len(ids.data) == 2


def test_rerank_score_and_classify(rerank_server: InProcessServer) -> None:
    docs = ["a story about a cat", "def main(): pass", "hello"]
    scored = rerank_server.post("/score", {"model": "tiny", "text_1": "tell me a story", "text_2": docs})
    assert scored.status_code == 200, scored.text
    scores = [d["score"] for d in scored.json()["data"]]
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)
    reranked = rerank_server.post(
        "/v1/rerank", {"model": "tiny", "query": "tell me a story", "documents": docs, "top_n": 2}
    )
    assert reranked.status_code == 200, reranked.text
    results = reranked.json()["results"]
    best = sorted(range(3), key=lambda i: -scores[i])[:2]
    assert [r["index"] for r in results] == best
    assert [r["relevance_score"] for r in results] == pytest.approx([scores[i] for i in best], abs=1e-6)
    assert results[0]["document"] == {"text": docs[best[0]]}
    classified = rerank_server.post("/classify", {"model": "tiny", "input": ["hello", "world"]})
    assert classified.status_code == 200, classified.text
    assert [len(d["probs"]) for d in classified.json()["data"]] == [1, 1]


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/embeddings", {"input": []}, "empty list"),
        ("/v1/embeddings", {"input": ""}, "at least one token"),
        ("/v1/embeddings", {"input": [[5] * 200]}, "max_model_len is 128"),
        ("/v1/embeddings", {"input": "x", "dimensions": 1000}, "exceeds"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("/classify", {"input": "x"}, "cannot serve 'classify'"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2}, "runner='pooling'"),
    ],
)
def test_bad_requests_are_400_naming_the_problem(
    embed_server: InProcessServer, path: str, body: dict[str, object], words: str
) -> None:
    response = embed_server.post(path, body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]


def test_truncate_prompt_tokens_and_a_pooling_request_to_a_generation_model(
    embed_server: InProcessServer, tiny_model: Path
) -> None:
    trimmed = embed_server.post("/v1/embeddings", {"input": [[5] * 200], "truncate_prompt_tokens": 100})
    assert trimmed.status_code == 200 and trimmed.json()["usage"]["prompt_tokens"] == 100
    generator = InProcessServer(tiny_model)
    try:
        refused = generator.post("/v1/embeddings", {"input": "hello"})
    finally:
        generator.close()
    assert refused.status_code == 400
    assert "generation model" in refused.json()["error"]["message"]


def test_bert_encoder_embeddings_and_cross_encoder_rerank(tmp_path: Path) -> None:
    """A sentence-transformers BERT embedder through /v1/embeddings and a BERT cross-encoder through /v1/rerank
    give sentence-transformers' own answers."""
    from kvik.testing.tiny_encoders import make_tiny_cross_encoder, make_tiny_encoder
    from sentence_transformers import CrossEncoder, SentenceTransformer

    texts = ["hello world", "tell me a story about a cat", "a"]
    embedder = make_tiny_encoder(tmp_path / "bert", "bert", "mean")
    server = InProcessServer(embedder, dtype="float32", max_model_len=128)
    try:
        response = server.post("/v1/embeddings", {"model": "tiny", "input": texts})
    finally:
        server.close()
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]])
    reference = SentenceTransformer(str(embedder), device="cpu").encode(texts)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)

    reranker = make_tiny_cross_encoder(tmp_path / "bert-ce", "bert")
    docs = ["a story about a cat", "def main(): pass", "hello"]
    server = InProcessServer(reranker, dtype="float32", max_model_len=128)
    try:
        response = server.post("/v1/rerank", {"model": "tiny", "query": "tell me a story", "documents": docs})
    finally:
        server.close()
    assert response.status_code == 200, response.text
    expected = CrossEncoder(str(reranker), device="cpu").predict([("tell me a story", d) for d in docs])
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected))
    np.testing.assert_allclose([r["relevance_score"] for r in results], np.sort(expected)[::-1], rtol=1e-4, atol=1e-6)
