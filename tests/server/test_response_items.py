"""Responses API output items and stream events, checked against the openai SDK's own (strict) models."""

from __future__ import annotations

from typing import Any

from kvik_server.response_items import OutputItems
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

EVENTS = TypeAdapter(ResponseStreamEvent)


def validated(events: list[dict[str, Any]]) -> list[str]:
    for number, event in enumerate(events):
        EVENTS.validate_python({**event, "sequence_number": number})
    return [e["type"] for e in events]


def test_reasoning_message_and_call_items() -> None:
    items = OutputItems()
    events = items.feed({"reasoning_content": "Use the tool."})
    events += items.feed({"reasoning_content": " Quickly."})
    events += items.feed({"content": "Checking"})
    events += items.feed({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                          "function": {"name": "f", "arguments": "{"}}]})  # fmt: skip
    events += items.feed({"tool_calls": [{"index": 0, "function": {"arguments": '"a": 1}'}}]})
    events += items.close("completed")
    assert validated(events) == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
    ]  # fmt: skip
    reasoning, message, call = items.items
    assert reasoning["content"][0]["text"] == "Use the tool. Quickly."
    assert message["content"][0]["text"] == "Checking" and items.output_text() == "Checking"
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == (
        "call_1",
        "f",
        '{"a": 1}',
        "completed",
    )
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    assert items.assistant_message() == {"role": "assistant", "content": "Checking", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}  # fmt: skip
    response = {"id": "resp_1", "object": "response", "created_at": 0, "model": "m", "output": items.items,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "status": "completed"}  # fmt: skip
    assert TypeAdapter(Response).validate_python(response).output_text == "Checking"


def test_empty_answer_still_has_a_message() -> None:
    items = OutputItems()
    events = items.close("incomplete")
    assert validated(events) == ["response.output_item.added", "response.content_part.added",
                                 "response.output_text.done", "response.content_part.done",
                                 "response.output_item.done"]  # fmt: skip
    assert items.items[0]["status"] == "incomplete" and items.output_text() == ""
    assert items.assistant_message() == {"role": "assistant", "content": None}


def test_text_after_a_call_opens_a_new_message() -> None:
    items = OutputItems()
    items.feed({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]})  # fmt: skip
    items.feed({"content": "Done."})
    validated(items.close("completed"))
    assert [i["type"] for i in items.items] == ["function_call", "message"]
