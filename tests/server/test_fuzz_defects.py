"""Regression tests for the defects fuzzing found (issue 18): each was a 500 and is now a 400 (or 404)
with OpenAI-shaped error JSON, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import InProcessServer

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BODY_ROUTES = ["/tokenize", "/detokenize", "/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def app_server(tiny_model: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tiny_model)
    yield server
    server.close()


def error_of(response: httpx.Response, status: int = 400, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def still_serving(server: InProcessServer) -> None:
    assert server.post("/v1/chat/completions", CHAT).status_code == 200
    assert server.post("/tokenize", {"prompt": "hello"}).json()["count"] > 0


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_deep_nesting_and_huge_integers_are_400_on_every_route(app_server: InProcessServer, path: str) -> None:
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # RecursionError in json.loads
    assert "nested" in error_of(app_server.post(path, deep))["message"]
    moderately_deep = json.dumps({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {
        "x": json.loads("[" * 500 + "]" * 500)}}).encode()  # parses, but too deep for recursive code later  # fmt: skip
    assert "nested" in error_of(app_server.post(path, moderately_deep))["message"]
    huge = b'{"prompt": ' + b"7" * 5000 + b', "tokens": [1]}'  # int() refuses > 4300 digits
    assert "digits" in error_of(app_server.post(path, huge))["message"]
    assert "digits" in error_of(app_server.post(path, b'{"tokens": [' + b"1" * 4301 + b"]}"))["message"]
    still_serving(app_server)


def test_same_parse_error_on_every_route(app_server: InProcessServer) -> None:
    messages = {error_of(app_server.post(path, b"{not json"))["message"] for path in BODY_ROUTES}
    assert len(messages) == 1, messages
    assert error_of(app_server.post("/tokenize", b"\xff\xfe\x00"))["message"]


def test_lone_surrogate_is_400(app_server: InProcessServer) -> None:
    for path, body, param in [
        ("/v1/completions", {"prompt": "\ud800abc", "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "abc\udfff"], "max_tokens": 1}, "prompt.1"),
        ("/tokenize", {"prompt": "\ud800abc"}, "prompt"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "\ud800abc"}]},
            "messages.0.content",
        ),
        ("/tokenize", {"messages": [{"role": "user", "content": "a\udbffb"}]}, "messages.0.content"),
        ("/v1/chat/completions", {**CHAT, "bad_words": ["x\ud800"]}, "bad_words.0"),  # the engine's tokenizer
        ("/v1/completions", {"prompt": "x", "guided_regex": "\ud800"}, "guided_regex"),  # the grammar compiler
        ("/v1/completions", {"prompt": "x", "logit_bias": {"\ud800": 1}}, "logit_bias.\ud800"),  # a key
        ("/v1/completions", {"prompt": "x", "model": "\ud800"}, "model"),  # quoted back in a 404 before
        ("/detokenize", {"tokens": [1], "model": "\udc00"}, "model"),
    ]:
        error = error_of(app_server.post(path, body), param=param)
        assert "surrogate" in error["message"], error
    # an escaped surrogate *pair* is one valid character
    assert app_server.post("/tokenize", {"prompt": "\ud83d\ude00"}).status_code == 200
    still_serving(app_server)


COLLIDING = [{"messages": []}, {"tokenize": True}, {"add_generation_prompt": False}, {"tools": []},
             {"documents": []}, {"conversation": [], "return_dict": True}]  # fmt: skip


@pytest.mark.parametrize("kwargs", COLLIDING)
def test_chat_template_kwargs_colliding_with_the_renderer_are_400(
    app_server: InProcessServer, kwargs: dict[str, Any]
) -> None:
    for path, body in [("/v1/chat/completions", CHAT), ("/tokenize", {"messages": CHAT["messages"]})]:
        error = error_of(app_server.post(path, {**body, "chat_template_kwargs": kwargs}), param="chat_template_kwargs")
        assert all(key in error["message"] for key in kwargs), error
    # other keys still reach the template
    assert app_server.post("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"x": 1}}).status_code == 200


def test_reserved_template_kwargs_cover_apply_chat_template() -> None:
    """Every named parameter of the installed transformers' apply_chat_template is reserved."""
    import inspect

    from kvik_server.chat_template import REQUEST_TEMPLATE_KEY, RESERVED_TEMPLATE_KWARGS
    from transformers import PreTrainedTokenizerBase

    parameters = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    named = {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    assert named - {"self", REQUEST_TEMPLATE_KEY} <= RESERVED_TEMPLATE_KWARGS


@pytest.mark.parametrize("kind", [{"messages": [], "tokenize": True}, ["text"], 7])
def test_content_part_type_that_is_not_a_string_is_400(app_server: InProcessServer, kind: Any) -> None:
    # found by the derandomized schema fuzz in CI: an unhashable "type" crashed the media-part check
    parts = [{"type": "text", "text": "a"}, {"type": kind, "text": "b"}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    error_of(app_server.post("/v1/chat/completions", body))
    still_serving(app_server)


@pytest.mark.parametrize("ids", [[-1, 5], [2**64, 5], [2**63], [5, 2**64 - 1], [10**6]])
def test_echo_with_out_of_vocabulary_ids_is_400(app_server: InProcessServer, ids: list[int]) -> None:
    for echo in (True, False):
        error = error_of(app_server.post("/v1/completions", {"prompt": ids, "echo": echo, "max_tokens": 1}))
        assert "vocabulary" in error["message"], error
    error_of(app_server.post("/v1/completions", {"prompt": [[5], ids], "echo": True, "max_tokens": 1}))
    error_of(app_server.post("/detokenize", {"tokens": ids}), param="tokens")
    ok = app_server.post("/v1/completions", {"prompt": [5, 6], "echo": True, "max_tokens": 1})
    echoed = app_server.engine.tokenizer.decode([5, 6])
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith(echoed)


def test_retrieve_model(app_server: InProcessServer) -> None:
    card = app_server.get("/v1/models/tiny")
    assert card.status_code == 200 and card.json()["id"] == "tiny" and card.json()["object"] == "model"
    assert card.json() == {**app_server.get("/v1/models").json()["data"][0], "created": card.json()["created"]}
    for unknown in ("gpt-4", "org/name", "tiny/x"):
        error = error_of(app_server.get(f"/v1/models/{unknown}"), 404, "model")
        assert error["code"] == "model_not_found" and unknown in error["message"]


def test_openapi_describes_health_metrics_and_errors(app_server: InProcessServer) -> None:
    doc = app_server.get("/openapi.json").json()
    health = doc["paths"]["/health"]["get"]["responses"]
    assert "content" not in health["200"]  # an empty body, as served
    served = app_server.get("/health")
    assert served.status_code == 200 and served.content == b""
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert app_server.get("/metrics").headers["content-type"].startswith("text/plain")
    assert "/v1/models/{model_id}" in doc["paths"]
    assert "422" not in json.dumps(doc["paths"])  # invalid requests are 400 with an error body
    assert doc["paths"]["/v1/completions"]["post"]["responses"]["400"]
    assert doc["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
