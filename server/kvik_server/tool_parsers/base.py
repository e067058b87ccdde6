"""The tool-parser contract, and turning successive extractions into OpenAI stream deltas.

A parser is a pure function of the text generated so far: ``extract(text, final)``. Its one
rule makes streaming correct by construction: for any text ``t`` and any prefix ``p`` of it,
``extract(p, final=False)`` is a *prefix* of ``extract(t, final=False)`` and of
``extract(t, final=True)`` — the content is a string prefix, the calls a list prefix whose
names are equal and whose argument strings are prefixes. A parser therefore withholds what
it cannot settle yet (a possible start of a call marker, a call whose name is not known,
arguments not yet complete) instead of guessing. The non-streamed answer is
``extract(text, final=True)``; the stream is the differences between successive
extractions, so the concatenated deltas always equal the non-streamed answer.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object; while streaming, a prefix of the final text
    complete: bool = False  # the model finished writing this call


@dataclass(slots=True)
class Extraction:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ToolParser(ABC):
    """Splits model output into content and tool calls (see the module docstring for the rule)."""

    name: ClassVar[str]
    # Markers such as Mistral's [TOOL_CALLS] are special tokens: decode with them kept.
    needs_special_tokens: ClassVar[bool] = False

    @abstractmethod
    def extract(self, text: str, final: bool) -> Extraction:
        """Content and calls settled in ``text``; with ``final`` the text is the whole output."""


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker`` (a marker may be starting)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def visible_content(content: str, final: bool) -> str:
    """Content a client may see: without trailing whitespace (while streaming it may turn out to be
    the gap before a call, so the finished answer drops it too); rstrip keeps the prefix rule."""
    return content.rstrip()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# Re-extract once the text grew by this fraction since the last extraction (and always at the end).
# Extraction reads the whole text, so doing it on every token of a long call costs O(n^2); this
# keeps the total near-linear, and delays a piece of a 20,000-character argument by ~80 characters.
# Skipping updates is always safe: each extraction extends the previous one (the prefix rule).
REEXTRACT_FRACTION = 1 / 256


class ToolCallStream:
    """Per choice: diffs successive extractions into OpenAI chat-chunk delta pieces."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.content_sent = 0
        self.ids: list[str] = []
        self.arguments_sent: list[int] = []
        self._extracted_len = -1

    def update(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(new content, tool_calls delta entries) for the output text so far."""
        if not final and len(text) - self._extracted_len < len(text) * REEXTRACT_FRACTION:
            return "", []
        self._extracted_len = len(text)
        got = self.parser.extract(text, final)
        content = visible_content(got.content, final)
        new_content = content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(content))
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(got.calls):
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.arguments_sent.append(len(call.arguments))
                deltas.append(
                    {"index": index, "id": self.ids[index], "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}
                )  # fmt: skip
            elif len(call.arguments) > self.arguments_sent[index]:
                piece = call.arguments[self.arguments_sent[index] :]
                self.arguments_sent[index] = len(call.arguments)
                deltas.append({"index": index, "function": {"arguments": piece}})
        return new_content, deltas

    @property
    def num_calls(self) -> int:
        return len(self.ids)


def message_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """The non-streamed ``message.tool_calls`` list."""
    return [
        {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]
