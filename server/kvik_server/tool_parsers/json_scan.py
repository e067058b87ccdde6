"""Incremental scanning of JSON tool calls in text that is still being generated.

Streaming tool calls must never show a client partial-JSON garbage, so instead of
forwarding the model's raw characters the scanners here report only what is *settled*:
the key/value pairs of an arguments object whose value is complete (a ``,`` or ``}``
follows it), plus the decoded beginning of a string value still being written (so a long
``code`` or ``content`` argument streams as it is generated). The arguments string is
rebuilt canonically from those pieces (``json.dumps`` spacing, non-ASCII escaped, which
also keeps lone surrogates from escapes valid), which gives the property every parser
relies on: the arguments reported for a prefix of the text are a prefix of those
reported for the whole text, and closing them (``"`` if a string is open, then ``}``)
always yields valid JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()
WHITESPACE = " \t\r\n"
NAME_KEYS = ("name",)
ARGUMENT_KEYS = ("arguments", "parameters")


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def dumps(value: Any) -> str:
    # ASCII: a \ud83d escape the model wrote alone decodes to a lone surrogate, which only an
    # escaped form can carry; escaping is per character, so prefixes stay prefixes.
    return json.dumps(value)


# The longest run of complete JSON string characters: plain ones, or whole escapes (an escape cut
# short, an invalid one, a raw control character or the closing quote ends it). An unrolled loop
# (every repetition starts at a backslash, so nothing backtracks): linear, in C, which matters
# because it runs on every streamed token of a long argument.
_STRING_BODY = re.compile(r'[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*')


def partial_string(text: str, i: int) -> str:
    """The decoded characters of the string starting at ``text[i]`` (``"``) up to where it is
    unfinished or invalid (an escape cut short, a raw control character) or closed."""
    match = _STRING_BODY.match(text, i + 1)
    assert match is not None  # the pattern matches the empty string
    # Decoded as the finished string will be (a \uXXXX surrogate alone becomes a lone surrogate).
    return str(json.loads(f'"{match.group()}"'))


@dataclass(slots=True)
class ObjectScan:
    """What is settled in a JSON object starting at ``text[start] == "{"``."""

    # complete (key, value, index where the value starts), in order
    pairs: list[tuple[str, Any, int]] = field(default_factory=list)
    pending_key: str | None = None  # a key whose value is still being written
    pending_at: int = -1  # where that value starts
    end: int | None = None  # index just after the closing brace, once closed
    broken: bool = False  # invalid JSON: the object can never be completed
    partial: str | None = None  # the decoded beginning of the pending value, when it is a string

    def canonical(self, close: bool = False) -> str:
        """``{"k": v, ...`` from the settled pairs and a pending string's beginning; closed with
        ``}`` once the object is (or, when ``close``, with ``"`` and ``}`` as needed)."""
        parts = [f"{dumps(k)}: {dumps(v)}" for k, v, _ in self.pairs]
        if self.end is None and self.partial is not None:
            parts.append(f"{dumps(self.pending_key)}: {dumps(self.partial)[:-1]}")  # no closing quote yet
        body = "{" + ", ".join(parts)
        if self.end is not None:
            return body + "}"
        return body + self.closer() if close else body

    def closer(self) -> str:
        """What makes the unfinished canonical text valid JSON."""
        return '"}' if self.partial is not None else "}"


def _decode(text: str, i: int) -> tuple[Any, int] | None:
    """One complete JSON value at ``text[i]`` and the index after it, or None (incomplete or invalid)."""
    try:
        return _DECODER.raw_decode(text, i)
    except (json.JSONDecodeError, RecursionError):
        return None


def _could_continue(text: str, i: int) -> bool:
    """False when ``text[i:]`` is certainly not the beginning of a JSON value (so waiting is pointless)."""
    rest = text[i:]
    if not rest:
        return True
    if rest[0] in '"{[-0123456789':
        return True
    return any(word.startswith(rest[: len(word)]) for word in ("true", "false", "null"))


def scan_object(text: str, start: int) -> ObjectScan:
    """Scan the object at ``text[start]`` (which must be ``{``) as far as it is settled."""
    scan = ObjectScan()
    i = skip_ws(text, start + 1)
    if i < len(text) and text[i] == "}":
        scan.end = i + 1
        return scan
    while i < len(text):
        key = _decode(text, i)
        if key is None or not isinstance(key[0], str):
            scan.broken = text[i] != '"'
            return scan
        i = skip_ws(text, key[1])
        if i >= len(text):
            return scan
        if text[i] != ":":
            scan.broken = True
            return scan
        i = skip_ws(text, i + 1)
        scan.pending_key, scan.pending_at = key[0], i
        value = _decode(text, i)
        if value is None:
            # Unfinished, or wrong in a way only the end of the text will show (then the
            # caller's final pass decides); broken only when no continuation could help.
            scan.broken = not _could_continue(text, i)
            if i < len(text) and text[i] == '"':
                scan.partial = partial_string(text, i)
            return scan
        j = skip_ws(text, value[1])
        if isinstance(value[0], str):
            scan.partial = value[0]  # reported as partial until its pair is settled
        if j >= len(text):
            return scan  # a number may still grow; anything else waits for its terminator too
        if text[j] not in ",}":
            scan.broken = True
            return scan
        scan.partial = None
        scan.pairs.append((key[0], value[0], i))
        scan.pending_key, scan.pending_at = None, -1
        if text[j] == "}":
            scan.end = j + 1
            return scan
        i = skip_ws(text, j + 1)
    return scan


@dataclass(slots=True)
class CallScan:
    """A ``{"name": ..., "arguments": {...}}`` object scanned as far as it is settled."""

    name: str | None = None
    arguments: str = ""  # canonical prefix of the arguments object ("" until it starts)
    arguments_closed: bool = False
    arguments_closer: str = "}"  # what closes unfinished arguments into valid JSON
    end: int | None = None  # index just after the call object, once closed
    broken: bool = False

    def final_arguments(self) -> str:
        """The arguments of a call the text ended in: what is settled, closed into valid JSON."""
        if not self.arguments:
            return "{}"
        return self.arguments if self.arguments_closed else self.arguments + self.arguments_closer


def scan_call(text: str, start: int) -> CallScan:
    """Scan a call object at ``text[start]`` (``{``); ``arguments`` may be an object or a JSON string."""
    outer = scan_object(text, start)
    call = CallScan(end=outer.end, broken=outer.broken)
    for key, value, at in outer.pairs:
        if key in NAME_KEYS and isinstance(value, str) and call.name is None:
            call.name = value
        elif key in ARGUMENT_KEYS and not call.arguments:
            if text[at] == "{":  # re-scanned, not dumped: the same string the unfinished scan built
                call.arguments, call.arguments_closed = scan_object(text, at).canonical(), True
            else:
                call.arguments, call.arguments_closed = _settled_arguments(value)
                call.broken = call.broken or not call.arguments
    if outer.pending_key in ARGUMENT_KEYS and not call.arguments:
        at = outer.pending_at
        if at < len(text) and text[at] == "{":
            inner = scan_object(text, at)
            call.arguments = inner.canonical()
            call.arguments_closed = inner.end is not None
            call.arguments_closer = inner.closer()
            call.broken = call.broken or inner.broken
    return call


def _settled_arguments(value: Any) -> tuple[str, bool]:
    """Canonical arguments from a complete value: an object, or a string holding one; ("", False) if neither."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return "", False
    if not isinstance(value, dict):
        return "", False
    return dumps(value), True


@dataclass(slots=True)
class ArrayScan:
    """A JSON array of call objects, ``[{...}, {...}]``, scanned as far as it is settled."""

    calls: list[CallScan] = field(default_factory=list)  # the last one may be unfinished
    end: int | None = None
    broken: bool = False


def scan_call_array(text: str, start: int) -> ArrayScan:
    """Scan ``[call, call, ...]`` at ``text[start]`` (``[``)."""
    scan = ArrayScan()
    i = skip_ws(text, start + 1)
    if i < len(text) and text[i] == "]":
        scan.end = i + 1
        return scan
    while i < len(text):
        if text[i] != "{":
            scan.broken = True
            return scan
        call = scan_call(text, i)
        scan.calls.append(call)
        if call.end is None or call.broken:
            scan.broken = call.broken
            return scan
        i = skip_ws(text, call.end)
        if i >= len(text):
            return scan
        if text[i] == "]":
            scan.end = i + 1
            return scan
        if text[i] != ",":
            scan.broken = True
            return scan
        i = skip_ws(text, i + 1)
    return scan
