"""Forced tool choices over 100 random schemas: arguments always parse and validate, streamed or not.

A tiny random-weight model samples at temperature 1 (the worst case for staying on a grammar), in-process,
so a hundred schemas take seconds; tests/server/test_tool_calling.py checks the same with the real SmolLM2
through the openai client on fewer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import InProcessServer
from test_tool_calling import schemas, tool

ASK = [{"role": "user", "content": "Call a tool."}]


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tiny_model, max_model_len=2048)
    yield server
    server.close()


def _streamed_call(text: str) -> tuple[list[dict[str, Any]], str | None]:
    """Rebuild the tool calls of an SSE body from their deltas (id and name first, then argument pieces)."""
    calls: list[dict[str, Any]] = []
    finish = None
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            for delta in choice["delta"].get("tool_calls") or []:
                if "id" in delta:
                    calls.append({"name": delta["function"]["name"], "arguments": ""})
                calls[delta["index"]]["arguments"] += delta["function"].get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return calls, finish


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])  # fmt: skip
@given(schema=schemas, other=schemas, named=st.booleans(), stream=st.booleans(), seed=st.integers(0, 10_000))
def test_forced_choices_validate_for_random_schemas(
    server: InProcessServer, schema: dict[str, Any], other: dict[str, Any], named: bool, stream: bool, seed: int
) -> None:
    choice: Any = {"type": "function", "function": {"name": "target"}} if named else "required"
    body = {"model": "tiny", "messages": ASK, "tools": [tool("target", schema), tool("other", other)],
            "tool_choice": choice, "parallel_tool_calls": False, "max_tokens": 1500, "temperature": 1.0,
            "seed": seed, "stream": stream}  # fmt: skip
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    if stream:
        calls, finish = _streamed_call(response.text)
    else:
        data = response.json()["choices"][0]
        finish = data["finish_reason"]
        calls = [c["function"] for c in data["message"]["tool_calls"]]
    assert finish == "tool_calls" and len(calls) == 1
    if named:
        assert calls[0]["name"] == "target"
    jsonschema.validate(json.loads(calls[0]["arguments"]), {"target": schema, "other": other}[calls[0]["name"]])
