"""Chat-style deltas → Responses API output items and their streaming events.

One builder serves both modes: a non-streamed response feeds it the whole answer as one
delta, a streamed one feeds each delta as it is settled and forwards the events. Items
appear in the order their first text arrives: reasoning, then the message, then function
calls (text after a call opens a new message item).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

Event = dict[str, Any]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the message / reasoning item receiving text
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> function_call item

    def feed(self, delta: dict[str, Any]) -> list[Event]:
        """Events for one chat delta (``reasoning_content``, ``content``, ``tool_calls``)."""
        events: list[Event] = []
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._text("message", delta["content"])
        for call in delta.get("tool_calls", []):
            if "id" in call:
                events += self._close_text()
                item = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "call_id": call["id"],
                        "name": call["function"]["name"], "arguments": ""}  # fmt: skip
                self.items.append(item)
                self._calls[call["index"]] = item
                events.append({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                               "item": copy.deepcopy(item)})  # fmt: skip
            item = self._calls[call["index"]]
            piece = call["function"].get("arguments", "")
            if piece:
                item["arguments"] += piece
                events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                               "output_index": self.items.index(item), "delta": piece})  # fmt: skip
        return events

    def close(self, status: str) -> list[Event]:
        """Finish every item with ``status`` (``completed`` / ``incomplete``); an answer with no
        output at all still gets one (empty) message, as OpenAI's does."""
        events = self._open_text("message") if not self.items else []
        events += self._close_text(status)
        for item in self.items:
            if item["type"] == "function_call" and item["status"] == "in_progress":
                item["status"] = status
                index = self.items.index(item)
                events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                               "output_index": index, "name": item["name"], "arguments": item["arguments"]})  # fmt: skip
                events.append({"type": "response.output_item.done", "output_index": index,
                               "item": copy.deepcopy(item)})  # fmt: skip
        return events

    # -- text items -------------------------------------------------------------
    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open["type"] != kind:
            events += self._close_text()
            events += self._open_text(kind)
        item = self._open
        assert item is not None
        item["content"][0]["text"] += text
        index = len(self.items) - 1
        kind_delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        event: Event = {"type": kind_delta, "item_id": item["id"], "output_index": index, "content_index": 0,
                        "delta": text}  # fmt: skip
        if kind == "message":
            event["logprobs"] = []
        events.append(event)
        return events

    def _open_text(self, kind: str) -> list[Event]:
        if kind == "message":
            item: dict[str, Any] = {"id": _id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                                    "content": []}  # fmt: skip
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": _id("rs"), "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        self.items.append(item)
        index = len(self.items) - 1
        added = {"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)}
        item["content"].append(part)
        self._open = item
        return [added, {"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "part": copy.deepcopy(part)}]  # fmt: skip

    def _close_text(self, status: str = "completed") -> list[Event]:
        events: list[Event] = []
        item = self._open
        if item is None:
            return events
        self._open = None
        item["status"] = status
        part = item["content"][0]
        index = self.items.index(item)
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "message":
            events.append({"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []})
        else:
            events.append({"type": "response.reasoning_text.done", **where, "text": part["text"]})
        events.append({"type": "response.content_part.done", **where, "part": copy.deepcopy(part)})
        events.append({"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)})
        return events

    # -- results -----------------------------------------------------------------
    def output_text(self) -> str:
        return "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")

    def assistant_message(self) -> dict[str, Any]:
        """The output as a chat message, for the stored conversation (reasoning left out)."""
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]  # fmt: skip
        message: dict[str, Any] = {"role": "assistant", "content": self.output_text() or None}
        if calls:
            message["tool_calls"] = calls
        return message
