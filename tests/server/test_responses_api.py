"""The Responses API (POST/GET/DELETE /v1/responses) through the official openai client, on the bundled SmolLM2."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from kvik_server.response_store import ResponseStore
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from server_harness import ServerProcess

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]},
}  # fmt: skip


@pytest.fixture(scope="module")
def client(smollm2_server: ServerProcess) -> Any:
    return smollm2_server.openai()


def test_text_answer_is_retrievable(client: Any) -> None:
    response = client.responses.create(model="smollm2", input="What is the capital of France?",
                                       instructions="Answer in one word.", max_output_tokens=8, temperature=0)  # fmt: skip
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete") and response.output_text
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    again = client.responses.retrieve(response.id)
    assert again.output_text == response.output_text and again.usage.output_tokens == usage.output_tokens
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_message_items_and_the_same_answer_streamed(client: Any) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}]
    kwargs = dict(model="smollm2", input=items, max_output_tokens=12, temperature=0)
    plain = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]  # fmt: skip
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if plain.status == "completed" else "response.incomplete"]  # fmt: skip
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text == events[-1].response.output_text  # greedy: the same text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == deltas and done.item_id == events[2].item.id


def test_raw_bodies_match_the_sdk_models_strictly(smollm2_server: ServerProcess) -> None:
    """The SDK builds its objects without validating; validate kvik's raw JSON and events strictly."""
    body = {"model": "smollm2", "input": "Weather in Oslo?", "tools": [WEATHER], "max_output_tokens": 30,
            "tool_choice": {"type": "function", "name": "get_weather"}}  # fmt: skip
    with httpx.Client(base_url=smollm2_server.base_url, timeout=60) as http:
        TypeAdapter(Response).validate_python(http.post("/v1/responses", json=body).json())
        with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    events = [TypeAdapter(ResponseStreamEvent).validate_python(json.loads(line[6:])) for line in lines]
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_stream_helper(client: Any) -> None:
    # (the helper wants response.completed; an answer cut by max_output_tokens ends with response.incomplete)
    with client.responses.stream(model="smollm2", input="Say hello.", max_output_tokens=60, temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text


def test_function_calling_round_trip(client: Any) -> None:
    first = client.responses.create(model="smollm2", input="What is the weather in Oslo?", tools=[WEATHER],
                                    tool_choice="required", parallel_tool_calls=False, max_output_tokens=60)  # fmt: skip
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    second = client.responses.create(
        model="smollm2", previous_response_id=first.id, tools=[WEATHER], tool_choice="none", max_output_tokens=10,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "It is 12 degrees and raining."}],
    )  # fmt: skip
    assert second.previous_response_id == first.id and second.output_text
    assert not [item for item in second.output if item.type == "function_call"]
    # The history the model saw contains the call and its result: more input tokens than the question alone.
    assert second.usage.input_tokens > first.usage.input_tokens


def test_named_function_streamed(client: Any) -> None:
    choice = {"type": "function", "name": "get_weather"}
    events = list(client.responses.create(model="smollm2", input="Weather in Rome?", tools=[WEATHER],
                                          tool_choice=choice, max_output_tokens=60, stream=True))  # fmt: skip
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather" and added.item.arguments == ""
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == pieces and done.item_id == added.item.id
    jsonschema.validate(json.loads(pieces), WEATHER["parameters"])
    final = events[-1].response
    assert events[-1].type == "response.completed" and final.output[0].arguments == pieces


def test_store_false_and_unknown_previous_response(client: Any) -> None:
    response = client.responses.create(model="smollm2", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.create(model="smollm2", input="Hi", previous_response_id=response.id, max_output_tokens=2)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": "x", "reasoning_effort": "high"}, "reasoning_effort"),
    ],
)
def test_bad_requests_are_400(smollm2_server: ServerProcess, body: dict[str, Any], param: str) -> None:
    response = httpx.post(smollm2_server.base_url + "/v1/responses", json={"model": "smollm2", **body}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_store_is_bounded_and_expires() -> None:
    now = [0.0]
    store = ResponseStore(max_entries=2, ttl_seconds=10, clock=lambda: now[0])
    for i in range(3):
        store.put(f"r{i}", {"id": f"r{i}"}, [])
        now[0] += 1
    assert store.get("r0") is None and len(store) == 2  # the oldest went first
    now[0] = 11.5  # r1 was stored at t=1, r2 at t=2
    assert store.get("r1") is None and store.get("r2") is not None
    now[0] = 12.0
    assert len(store) == 0
    with pytest.raises(ValueError, match="max_entries"):
        ResponseStore(max_entries=0)
