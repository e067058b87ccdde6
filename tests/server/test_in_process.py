"""The app in-process (real engine, tiny model): schema fuzzing (never a 5xx, errors always OpenAI-shaped),
unexpected errors as a generic 500, and /ready catching a wedged engine."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvik_server.context import ServerSettings
from server_harness import InProcessServer


@pytest.fixture(scope="module")
def app_server(tiny_model: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(
        tiny_model, ServerSettings(served_model_name="tiny", max_request_body_bytes=1 << 20, ready_stall_seconds=1.0)
    )
    yield server
    server.close()


text = st.text(max_size=40)
junk = st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(), text,
                 st.lists(st.integers(-5, 600), max_size=4), st.dictionaries(text, st.integers(), max_size=2))  # fmt: skip
content = st.one_of(text, st.none(), st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                     "text": text}), max_size=2), junk)  # fmt: skip
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "x"]),
                           "content": content}),
    st.dictionaries(text, junk, max_size=3),
)  # fmt: skip
# Plausible values (in and out of range) per field; `junk` replaces them in the "junk" bodies.
COMMON: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["tiny", "gpt-4", ""]),
    "max_tokens": st.one_of(st.integers(-2, 8), st.sampled_from([None, 10**9])),
    "n": st.integers(-1, 3),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), st.sampled_from([float("nan"), float("inf")])),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "top_k": st.integers(-2, 50),
    "min_p": st.floats(-0.5, 1.5, allow_nan=False),
    "seed": st.integers(-(2**70), 2**70),
    "stop": st.one_of(text, st.lists(text, max_size=3)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "presence_penalty": st.floats(-3, 3, allow_nan=False),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "2", "x", "-1"]), st.floats(-100, 100)),
    "repetition_penalty": st.floats(-1, 3, allow_nan=False),
    "min_tokens": st.integers(-1, 10),
    "stop_token_ids": st.lists(st.integers(-1, 600), max_size=3),
    "ignore_eos": st.booleans(),
    "priority": st.integers(-5, 5),
    "logprobs": st.sampled_from([None, False, True, 0, 2, 30]),
    "tools": st.sampled_from([None, [], [{"type": "function"}]]),
    "suffix": st.sampled_from([None, "", "tail"]),
    "echo": st.booleans(),
    "top_logprobs": st.integers(-1, 25),
    "best_of": st.integers(0, 4),
    "guided_regex": st.sampled_from(["[0-9]{2}", "(", "a|b"]),
    "guided_choice": st.lists(text, max_size=3),
    "guided_json": st.sampled_from([{"type": "object"}, {"type": "nonsense"}, "{bad", "{}"]),
    "guided_grammar": st.sampled_from(['root ::= "a"', "root ::= ("]),
    "response_format": st.sampled_from(
        [
            {"type": "json_object"},
            {"type": "json_schema"},
            {"type": "xml"},
            {"type": "json_schema", "json_schema": {"schema": {"type": "string"}}},
        ]
    ),
}
JUNK = dict.fromkeys(COMMON, junk)
VALID: dict[str, st.SearchStrategy[Any]] = {  # in-range values only: these requests generate
    "model": st.just("tiny"),
    "max_tokens": st.integers(1, 8),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**31),
    "stop": st.one_of(text.filter(bool), st.lists(text.filter(bool), max_size=3)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
    "priority": st.integers(-5, 5),
}
extra_fields = st.dictionaries(text, junk, max_size=2)


def body(required: dict[str, st.SearchStrategy[Any]], fields: dict[str, st.SearchStrategy[Any]]) -> Any:
    extra = st.just({}) if fields is VALID else st.one_of(st.just({}), st.just({}), extra_fields)
    return st.builds(lambda r, o, e: {**r, **o, **e}, st.fixed_dictionaries(required),
                     st.fixed_dictionaries({}, optional=fields), extra)  # fmt: skip


def bodies(required: dict[str, st.SearchStrategy[Any]], required_junk: dict[str, st.SearchStrategy[Any]]) -> Any:
    """Mostly plausible bodies (they reach the engine), some with junk fields, a few junk documents."""
    valid = body(required, VALID)
    return st.one_of(valid, valid, body(required, COMMON), body(required_junk, JUNK), body({}, COMMON), junk)


good_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": text}
)
chat_bodies = bodies({"messages": st.lists(good_message, min_size=1, max_size=3)},
                     {"messages": st.one_of(st.lists(message, min_size=1, max_size=3), junk)})  # fmt: skip
prompt = st.one_of(text, st.lists(text, max_size=2), st.lists(st.integers(-3, 600), max_size=6),
                   st.lists(st.lists(st.integers(0, 600), max_size=4), max_size=2))  # fmt: skip
completion_bodies = bodies({"prompt": prompt}, {"prompt": st.one_of(prompt, junk)})


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat(app_server: InProcessServer, body: Any) -> None:
    check(app_server.post("/v1/chat/completions", body))


@FUZZ
@given(body=completion_bodies)
def test_fuzz_completions(app_server: InProcessServer, body: Any) -> None:
    check(app_server.post("/v1/completions", body))


@FUZZ
@given(body=st.one_of(st.fixed_dictionaries({"prompt": junk}), st.fixed_dictionaries({"messages": junk}),
                      st.fixed_dictionaries({"tokens": junk}), junk))  # fmt: skip
def test_fuzz_tokenize(app_server: InProcessServer, body: Any) -> None:
    check(app_server.post("/tokenize", body))
    check(app_server.post("/detokenize", body))


def test_unexpected_error_is_generic_500_and_server_keeps_serving(
    app_server: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app_server.engine.tokenizer, "apply_chat_template", broken)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = app_server.post("/v1/chat/completions", body)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"] and "Traceback" not in response.text
    monkeypatch.undo()
    assert app_server.post("/v1/chat/completions", body).status_code == 200
    assert app_server.run(app_server.client.get("/health")).status_code == 200


def test_ready_fails_while_engine_is_wedged(app_server: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work queued and no engine step for > ready_stall_seconds (1 s here): /ready 503, /health still 200."""
    core = app_server.engine.engine  # the LLMEngine the AsyncLLM steps on its thread
    unblock = threading.Event()
    step = core.step

    def wedged_step() -> Any:
        unblock.wait(30)
        return step()

    assert app_server.run(app_server.client.get("/ready")).status_code == 200
    time.sleep(1.2)  # idle for longer than the stall limit is still ready
    assert app_server.run(app_server.client.get("/ready")).status_code == 200
    monkeypatch.setattr(core, "step", wedged_step)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    pending = asyncio.run_coroutine_threadsafe(
        app_server.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}),
        app_server.loop,
    )
    try:
        time.sleep(1.5)
        ready = app_server.run(app_server.client.get("/ready"))
        assert ready.status_code == 503 and "no progress" in ready.json()["reason"], ready.text
        assert app_server.run(app_server.client.get("/health")).status_code == 200  # liveness only
    finally:
        unblock.set()
    assert pending.result(30).status_code == 200
    monkeypatch.undo()
    assert app_server.run(app_server.client.get("/ready")).status_code == 200
