"""Every failure is OpenAI-shaped JSON with the right status: 400, 401, 404, 413, plus auth rules."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import openai
import pytest
from server_harness import MAX_MODEL_LEN, ServerProcess

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_unknown_model_and_route(server: ServerProcess) -> None:
    with server.client() as c:
        error = assert_error(c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model")
        assert "gpt-4" in error["message"] and error["code"] == "model_not_found"
        assert_error(c.get("/v1/nothing-here"), 404)
        assert_error(c.get("/nothing-here"), 404)
        assert_error(c.get("/v1/chat/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        server.openai().completions.create(model="nope", prompt="x", max_tokens=1)


def test_unknown_and_unsupported_fields(server: ServerProcess) -> None:
    with server.client() as c:
        error = assert_error(c.post("/v1/chat/completions", json={**CHAT, "max_tokenz": 3}), 400, "max_tokenz")
        assert "max_tokenz" in error["message"]
        for field, value in [("functions", [{"name": "f"}]), ("audio", {"voice": "x"}), ("modalities", ["audio"]),
                             ("reasoning_effort", "high"), ("prediction", {"type": "content", "content": "x"})]:  # fmt: skip
            error = assert_error(c.post("/v1/chat/completions", json={**CHAT, field: value}), 400, field)
            assert "not supported" in error["message"] and error["code"] == "unsupported_parameter"
        error = assert_error(c.post("/v1/completions", json={"prompt": "x", "suffix": "tail"}), 400, "suffix")
        assert "suffix" in error["message"] and "not supported" in error["message"]
        assert_error(c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "x",
                                                                                "bogus": 1}]}), 400)  # fmt: skip
        assert_error(c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "tool", "content": "x"}]}), 400)
        tools = [{"type": "function", "function": {"name": "f"}}]  # "auto" needs --enable-auto-tool-choice
        error = assert_error(c.post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "auto"}), 400,
                             "tool_choice")  # fmt: skip
        assert "--enable-auto-tool-choice" in error["message"]
        assert_error(c.post("/v1/chat/completions", json={**CHAT, "messages": []}), 400, "messages")
        assert_error(c.post("/v1/chat/completions", json={"max_tokens": 2}), 400, "messages")
        assert_error(c.post("/v1/completions", json={"prompt": "x", "n": "many"}), 400, "n")
        assert_error(c.post("/v1/completions", json={"prompt": []}), 400, "prompt")
        error = assert_error(c.post("/v1/completions", json={"prompt": [1.5]}), 400, "prompt")
        assert "list of token ids" in error["message"]
        assert_error(c.post("/v1/completions", json={"prompt": ["a"] * 2049}), 400, "prompt")  # OpenAI's batch cap
        assert_error(c.post("/v1/chat/completions", json={**CHAT, "n": 129}), 400, "n")  # OpenAI's n cap
        assert_error(c.post("/v1/completions", json={"prompt": [10**9]}), 400)  # outside the vocabulary
        assert_error(c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
        assert_error(c.post("/v1/completions", json=[1, 2]), 400)


def test_prompt_too_long_names_both_lengths(server: ServerProcess) -> None:
    with server.client() as c:
        ids = list(range(10, 10 + MAX_MODEL_LEN + 5))
        error = assert_error(c.post("/v1/completions", json={"prompt": ids}), 400)
        assert str(MAX_MODEL_LEN) in error["message"] and str(len(ids)) in error["message"]
        assert error["code"] == "context_length_exceeded"
        error = assert_error(c.post("/v1/completions", json={"prompt": [10, 11, 12], "max_tokens": MAX_MODEL_LEN}), 400)
        assert str(MAX_MODEL_LEN) in error["message"] and str(MAX_MODEL_LEN + 3) in error["message"]
        long_chat = {"messages": [{"role": "user", "content": "hello world " * MAX_MODEL_LEN}]}
        error = assert_error(c.post("/v1/chat/completions", json=long_chat), 400, "messages")
        assert str(MAX_MODEL_LEN) in error["message"]


def test_body_too_large(server: ServerProcess) -> None:
    with server.client() as c:  # the shared server runs with --max-request-body-bytes 64KiB
        big = {"prompt": "x" * 70_000, "max_tokens": 1}
        error = assert_error(c.post("/v1/completions", json=big), 413)
        assert str(64 * 1024) in error["message"]

        def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
            for _ in range(70):
                yield b" " * 1024

        assert_error(c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    # a lying Content-Length is refused before the body is read
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + server.api_key.encode() + b"\r\n"
                     b"Content-Length: 999999999\r\n\r\n{}")  # fmt: skip
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_auth(server: ServerProcess) -> None:
    url = server.base_url
    for path, method in [("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/tokenize", "POST"),
                         ("/detokenize", "POST")]:  # fmt: skip
        r = httpx.request(method, url + path, json={})
        assert_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.request(method, url + path, json={}, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.request(method, url + path, json={}, headers={"Authorization": "Basic abc"}), 401)
    for path in ("/health", "/ready", "/version", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/v1/models", headers=server.headers).status_code == 200
