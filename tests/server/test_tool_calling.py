"""Tool calling on /v1/chat/completions with the bundled SmolLM2 through the official openai client.

``required`` and named tool choices decode under the tools' JSON-schema grammar, so even this
135M model always returns arguments that parse and validate, streamed or not, for any schema.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter
from server_harness import ServerProcess

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}}, "required": ["tz"]}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tools."}]

# Bounded value schemas (strings have a maxLength, integers a range) so every answer fits in max_tokens.
leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.text("abcxyz", min_size=1, max_size=5), min_size=1, max_size=3, unique=True)
    .map(lambda values: {"type": "string", "enum": values}),
)  # fmt: skip
names = st.sampled_from(["city", "count", "flag", "tags", "mode", "n", "query", "options"])


def objects(values: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(names, values, min_size=1, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda required: {"type": "object", "properties": props, "required": sorted(required)}
        )
    )


values = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(1, 2)),
        objects(inner),
    ),
    max_leaves=3,
)
schemas = objects(values)


def tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def streamed_calls(client: Any, **kwargs: Any) -> tuple[list[dict[str, Any]], str | None, str]:
    """Consume a stream with the openai client; rebuild the calls from their deltas."""
    calls: list[dict[str, Any]] = []
    finish, content = None, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # first delta of a call: id, type and name
                    assert delta.index == len(calls) and delta.type == "function" and delta.id.startswith("call_")
                    calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return calls, finish, content


@pytest.fixture(scope="module")
def client(smollm2_server: ServerProcess) -> Any:
    return smollm2_server.openai()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])  # fmt: skip
@given(schema=schemas, other=schemas, named=st.booleans(), stream=st.booleans(), seed=st.integers(0, 1000))
def test_forced_tool_choice_always_validates(client: Any, schema: dict[str, Any], other: dict[str, Any],
                                             named: bool, stream: bool, seed: int) -> None:  # fmt: skip
    tools = [tool("target", schema), tool("other", other)]
    choice: Any = {"type": "function", "function": {"name": "target"}} if named else "required"
    kwargs = dict(model="smollm2", messages=ASK, tools=tools, tool_choice=choice, parallel_tool_calls=False,
                  max_tokens=200, temperature=1.0, seed=seed)  # fmt: skip
    if stream:
        calls, finish, content = streamed_calls(client, **kwargs)
    else:
        response = client.chat.completions.create(**kwargs)
        message = response.choices[0].message
        finish, content = response.choices[0].finish_reason, message.content or ""
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
    assert finish == "tool_calls" and content == ""
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    if named:
        assert calls[0]["name"] == "target"
    by_name = {"target": schema, "other": other}
    jsonschema.validate(json.loads(calls[0]["arguments"]), by_name[calls[0]["name"]])


def test_required_with_parallel_calls(client: Any) -> None:
    response = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required", max_tokens=50, seed=3)  # fmt: skip
    choice = response.choices[0]
    calls = choice.message.tool_calls
    assert calls and choice.message.content is None
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]  # max_tokens may cut the last one
    assert choice.finish_reason in ("tool_calls", "length")
    for call in complete:
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    for call in calls:
        assert isinstance(json.loads(call.function.arguments), dict)  # even a cut-off call is valid JSON


def test_stream_helper_accumulates_the_deltas(client: Any) -> None:
    """The openai SDK's own stream accumulator rebuilds the same call from kvik's deltas."""
    with client.chat.completions.stream(model="smollm2", messages=ASK, tools=[WEATHER],
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        max_tokens=80, seed=1) as stream:  # fmt: skip
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_raw_bodies_match_the_sdk_models_strictly(smollm2_server: ServerProcess) -> None:
    """The SDK builds its objects without validating; validate kvik's raw JSON and chunks strictly."""
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 50, "seed": 5}  # fmt: skip
    with httpx.Client(base_url=smollm2_server.base_url, timeout=60) as http:
        completion = TypeAdapter(ChatCompletion).validate_python(http.post("/v1/chat/completions", json=body).json())
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            lines = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert completion.choices[0].message.tool_calls and lines[-1] == "[DONE]"
    chunks = [TypeAdapter(ChatCompletionChunk).validate_python(json.loads(line)) for line in lines[:-1]]
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)


def test_auto_mode_streams_the_same_answer(client: Any) -> None:
    """With the hermes tool parser and qwen3 reasoning parser on, plain answers stream unchanged."""
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Write a haiku about rain."}],
                  tools=[WEATHER], tool_choice="auto", max_tokens=24, temperature=0)  # fmt: skip
    plain = client.chat.completions.create(**kwargs)
    calls, finish, content = streamed_calls(client, **kwargs)
    assert content == plain.choices[0].message.content and content
    assert calls == [] and finish == plain.choices[0].finish_reason


def test_each_of_n_choices_streams_its_own_calls(client: Any) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice=choice, n=2,
                                            max_tokens=60, seed=7, stream=True)  # fmt: skip
    calls: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    finish: dict[int, str | None] = {}
    for chunk in stream:
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                if delta.id is not None:
                    calls[c.index].append({"id": delta.id, "arguments": ""})
                calls[c.index][delta.index]["arguments"] += delta.function.arguments or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    assert calls[0][0]["id"] != calls[1][0]["id"]
    for index in (0, 1):
        (call,) = calls[index]
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_tool_results_in_the_history(client: Any) -> None:
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]  # fmt: skip
    response = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], tool_choice="none",
                                              max_tokens=8)  # fmt: skip
    assert response.choices[0].message.content and not response.choices[0].message.tool_calls
    usage = response.usage
    assert usage.completion_tokens_details.reasoning_tokens == 0  # --reasoning-parser qwen3, no <think>


def test_auto_choice_answers_in_text_when_the_model_does_not_call(client: Any) -> None:
    response = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi."}],
                                              tools=[WEATHER], max_tokens=8, temperature=0)  # fmt: skip
    choice = response.choices[0]
    assert choice.message.content and not choice.message.tool_calls and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tool_choice": "required"}, "needs a non-empty `tools` list"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in `tools`"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "drop response_format",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
                "tool_choice": "required",
            },
            'must be a JSON schema of type "object"',
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_400(smollm2_server: ServerProcess, body: dict[str, Any], message: str) -> None:
    response = httpx.post(smollm2_server.base_url + "/v1/chat/completions", timeout=30,
                          json={"model": "smollm2", "messages": ASK, "max_tokens": 4, **body})  # fmt: skip
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"] or message in json.dumps(response.json())


def test_history_reaches_the_template_as_templates_expect() -> None:
    """Assistant tool_calls go to the template with arguments as objects (templates `tojson` them);
    tool results keep their tool_call_id; a tool message without one is refused."""
    from kvik_server.protocol import ChatMessage
    from kvik_server.serving_chat import template_message

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    assistant = template_message(ChatMessage.model_validate({"role": "assistant", "tool_calls": [call]}))
    assert assistant == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}  # fmt: skip
    tool = template_message(ChatMessage.model_validate({"role": "tool", "tool_call_id": "call_1", "content": "9C"}))
    assert tool == {"role": "tool", "content": "9C", "tool_call_id": "call_1"}
    with pytest.raises(ValueError, match="tool_call_id"):
        ChatMessage.model_validate({"role": "tool", "content": "9C"})
    with pytest.raises(ValueError, match="only assistant messages"):
        ChatMessage.model_validate({"role": "user", "content": "x", "tool_calls": [call]})
