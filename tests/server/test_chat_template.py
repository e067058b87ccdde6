"""Chat templates sent in requests: refused unless trusted; every render sandboxed and bounded in time
and size, so a hostile template cannot hold the tokenizer worker (issue 18, fuzz defect 5)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvik_server.chat_template import RenderTimeout, RenderWatchdog
from kvik_server.context import ServerSettings
from server_harness import InProcessServer

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"messages": MESSAGES, "max_tokens": 2}
BRACKETS = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
# 10**10 empty loop iterations: hours of rendering, no output (so only the time bound stops it)
ENDLESS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def default_server(tiny_model: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tiny_model)
    yield server
    server.close()


@pytest.fixture(scope="module")
def trusting_server(tiny_model: Path) -> Iterator[InProcessServer]:
    settings = ServerSettings(served_model_name="tiny", trust_request_chat_template=True, chat_template_timeout=TIMEOUT)
    server = InProcessServer(tiny_model, settings)
    yield server
    server.close()


def error_of(response: httpx.Response, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


def test_request_templates_refused_by_default(default_server: InProcessServer) -> None:
    bodies = [({**CHAT, "chat_template": BRACKETS}, "/v1/chat/completions"),
              ({**CHAT, "chat_template_kwargs": {"chat_template": BRACKETS}}, "/v1/chat/completions"),
              ({"messages": MESSAGES, "chat_template": BRACKETS}, "/tokenize"),
              ({"messages": MESSAGES, "chat_template_kwargs": {"chat_template": ENDLESS}}, "/tokenize")]  # fmt: skip
    for body, path in bodies:
        start = time.monotonic()
        error = error_of(default_server.post(path, body), param="chat_template")
        assert "--trust-request-chat-template" in error["message"]
        assert time.monotonic() - start < 1.0
    assert default_server.post("/v1/chat/completions", CHAT).status_code == 200


def test_trusted_request_template_is_rendered(trusting_server: InProcessServer) -> None:
    tokenizer = trusting_server.engine.tokenizer
    expected = list(tokenizer.encode("[hi]", add_special_tokens=False))
    for body in ({"messages": MESSAGES, "chat_template": BRACKETS},
                 {"messages": MESSAGES, "chat_template_kwargs": {"chat_template": BRACKETS}}):  # fmt: skip
        response = trusting_server.post("/tokenize", body)
        assert response.status_code == 200 and response.json()["tokens"] == expected, response.text
    conflicting = {"messages": MESSAGES, "chat_template": BRACKETS, "chat_template_kwargs": {"chat_template": "x"}}
    error_of(trusting_server.post("/tokenize", conflicting))


def test_templates_render_in_the_sandbox(trusting_server: InProcessServer) -> None:
    # ImmutableSandboxedEnvironment: no mutation of the data passed in, no Python internals
    for template in ("{{ messages.append(1) }}", "{{ messages.__class__.__subclasses__() }}",
                     "{{ raise_exception('no') }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"):  # fmt: skip
        error = error_of(trusting_server.post("/tokenize", {"messages": MESSAGES, "chat_template": template}))
        assert "chat template" in error["message"], error


def test_output_size_is_bounded(trusting_server: InProcessServer) -> None:
    for template in ("{{ 'x' * 3000000 }}",  # ~60 bytes expanding to megabytes
                     "{% for a in range(1000) %}{% for b in range(1000) %}xxxxxxxx{% endfor %}{% endfor %}"):  # fmt: skip
        start = time.monotonic()
        error = error_of(trusting_server.post("/v1/chat/completions", {**CHAT, "chat_template": template}), "messages")
        assert "characters" in error["message"] and time.monotonic() - start < TIMEOUT + 1.0


def test_time_is_bounded_and_others_are_served_meanwhile(trusting_server: InProcessServer) -> None:
    server = trusting_server

    async def timed(body: dict[str, Any], delay: float = 0.0) -> tuple[httpx.Response, float]:
        await asyncio.sleep(delay)
        start = time.monotonic()
        response = await server.client.post("/v1/chat/completions", json=body)
        return response, time.monotonic() - start

    async def scenario() -> list[tuple[httpx.Response, float]]:
        hostile = timed({**CHAT, "chat_template": ENDLESS})
        normal = [timed(CHAT, delay=0.2), timed({**CHAT, "chat_template": BRACKETS}, delay=0.3)]
        return list(await asyncio.gather(hostile, *normal))

    (hostile, hostile_s), *others = server.run(scenario(), timeout=30)
    error = error_of(hostile, "messages")
    assert "took more than" in error["message"] and hostile_s < TIMEOUT + 2.0
    for response, seconds in others:  # queued behind the hostile render for at most the time bound
        assert response.status_code == 200 and seconds < TIMEOUT + 2.0, (response.text, seconds)
    start = time.monotonic()
    assert server.post("/v1/chat/completions", CHAT).status_code == 200
    assert time.monotonic() - start < 1.0


def test_watchdog_interrupts_only_the_render_in_progress() -> None:
    watchdog = RenderWatchdog()

    def spin(seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "done"

    start = time.monotonic()
    with pytest.raises(RenderTimeout):
        watchdog.run(lambda: spin(30), 0.1)
    assert time.monotonic() - start < 1.0
    assert watchdog.run(lambda: spin(0.01), 1.0) == "done"
    # deadlines that expire around the moment the render returns never leak an interrupt past run()
    for _ in range(200):
        with contextlib.suppress(RenderTimeout):
            watchdog.run(lambda: spin(0.0005), 0.0005)
        spin(0.001)  # an interrupt still pending would land here and fail the test
