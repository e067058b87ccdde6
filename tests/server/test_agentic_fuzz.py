"""Fuzzing the tool-calling fields of /v1/chat/completions and the whole of /v1/responses in-process
(tiny model, tool and reasoning parsers on): never a 5xx, errors always OpenAI-shaped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_in_process import FUZZ, InProcessServer, check, junk, text

SCHEMAS = [None, {"type": "object", "properties": {"a": {"type": "integer"}}}, {"type": "object"}, {"type": "nonsense"},
           {"type": "string"}, {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}},
                                "required": ["s"]}, {"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x"}]  # fmt: skip
tool_names = st.sampled_from(["f", "g", "bad name", ""])
chat_tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search"]), "function":
                                   st.fixed_dictionaries({"name": tool_names}, optional={"parameters": st.sampled_from(
                                       SCHEMAS), "description": text, "strict": st.booleans()})})  # fmt: skip
chat_choice = st.one_of(st.sampled_from(["none", "auto", "required", "sometimes"]),
                        st.fixed_dictionaries({"type": st.just("function"),
                                               "function": st.fixed_dictionaries({"name": tool_names})}), junk)  # fmt: skip
call = st.fixed_dictionaries({"id": text, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": tool_names, "arguments": st.sampled_from(['{"a": 1}', "{bad", "[]", ""])})})  # fmt: skip
history_message = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": text}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.one_of(st.none(), text)},
                          optional={"tool_calls": st.lists(call, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": text}, optional={"tool_call_id": text}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "tool"]), "content": text, "tool_calls": junk}),
)  # fmt: skip
chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(history_message, min_size=1, max_size=4), "max_tokens": st.integers(1, 8)},
    optional={"tools": st.one_of(st.lists(chat_tool, max_size=3), junk), "tool_choice": chat_choice,
              "parallel_tool_calls": st.one_of(st.booleans(), junk), "stream": st.booleans(),
              "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}])},
)  # fmt: skip

response_tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "file_search"]), "name": tool_names},
                                      optional={"parameters": st.sampled_from(SCHEMAS)})  # fmt: skip
part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "input_image", "refusal"]),
                              "text": st.one_of(text, junk)})  # fmt: skip
item = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant", "tool"]),
                           "content": st.one_of(text, st.lists(part, max_size=2), junk)},
                          optional={"type": st.just("message")}),
    st.fixed_dictionaries({"type": st.just("function_call")},
                          optional={"call_id": st.one_of(text, junk), "name": tool_names, "arguments": text}),
    st.fixed_dictionaries({"type": st.just("function_call_output")},
                          optional={"call_id": st.one_of(text, junk), "output": st.one_of(text, junk)}),
    st.fixed_dictionaries({"type": st.sampled_from(["reasoning", "item_reference", "x"])}),
    st.dictionaries(text, junk, max_size=2),
)  # fmt: skip
good_item = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"]), "content": text}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": text, "name": tool_names,
                           "arguments": st.sampled_from(['{"a": 1}', "{bad"])}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": text, "output": text}),
)  # fmt: skip
good_tool = st.fixed_dictionaries({"type": st.just("function"), "name": st.sampled_from(["f", "g"])},
                                  optional={"parameters": st.sampled_from(SCHEMAS[:3] + SCHEMAS[5:])})  # fmt: skip
PLAUSIBLE = {"model": st.just("tiny"), "instructions": text,
             "tools": st.one_of(st.lists(good_tool, min_size=1, max_size=2), st.lists(response_tool, max_size=2)),
             "tool_choice": st.one_of(st.sampled_from(["none", "auto", "auto", "required"]),
                                      st.fixed_dictionaries({"type": st.just("function"), "name": st.just("f")})),
             "parallel_tool_calls": st.booleans(), "stream": st.booleans(), "store": st.booleans(),
             "temperature": st.floats(0, 2), "top_p": st.floats(0.1, 1), "metadata": st.dictionaries(text, text,
                                                                                                     max_size=2)}  # fmt: skip
JUNK_FIELDS = {name: junk for name in [*PLAUSIBLE, "previous_response_id", "text", "truncation", "include",
                                       "background"]}  # fmt: skip


def response_body(inputs: st.SearchStrategy[Any], fields: dict[str, st.SearchStrategy[Any]]) -> Any:
    return st.fixed_dictionaries({"input": inputs, "max_output_tokens": st.integers(1, 8)}, optional=fields)


response_bodies = st.one_of(
    response_body(st.one_of(text, st.lists(good_item, min_size=1, max_size=4)), PLAUSIBLE),
    response_body(st.one_of(text, st.lists(good_item, min_size=1, max_size=4)), PLAUSIBLE),
    response_body(st.one_of(junk, st.lists(item, max_size=4)), PLAUSIBLE),
    response_body(text, JUNK_FIELDS),
    st.dictionaries(text, junk, max_size=3),
    junk,
)


@pytest.fixture(scope="module")
def agentic_server(tiny_model: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tiny_model)
    settings = server.app.state.ctx.settings
    settings.enable_auto_tool_choice, settings.tool_call_parser, settings.reasoning_parser = True, "hermes", "qwen3"
    yield server
    server.close()


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat_tools(agentic_server: InProcessServer, body: Any) -> None:
    check(agentic_server.post("/v1/chat/completions", body))


@FUZZ
@given(body=response_bodies, follow_up=st.booleans())
def test_fuzz_responses(agentic_server: InProcessServer, body: Any, follow_up: bool) -> None:
    response = agentic_server.post("/v1/responses", body)
    check(response)
    if follow_up and response.status_code == 200 and isinstance(body, dict) and not body.get("stream"):
        response_id = response.json()["id"]
        check(agentic_server.post("/v1/responses", {**body, "previous_response_id": response_id}))
        check(agentic_server.run(agentic_server.client.get(f"/v1/responses/{response_id}")))
