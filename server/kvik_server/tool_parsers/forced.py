"""``tool_choice`` = ``required`` or a named function: decoding under a JSON-schema grammar.

The model cannot write anything but valid calls: for a named function the output *is* its
arguments object (the function's ``parameters`` schema); for ``required`` it is a JSON array
of ``{"name": ..., "arguments": ...}`` objects, each matching one tool's schema (at most one
element when ``parallel_tool_calls`` is false). The parsers below read those outputs with the
same settled-prefix scanners as the free-form parsers, so streaming works the same way.
"""

from __future__ import annotations

import copy
from typing import Any

from kvik_server.tool_parsers.base import Extraction, ToolCall, ToolParser
from kvik_server.tool_parsers.json_scan import scan_call_array, scan_object, skip_ws

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def parameters_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's JSON schema for its arguments (no ``parameters`` means no arguments); ``ValueError``
    unless it describes an object, as OpenAI requires (arguments are a JSON object)."""
    params = tool["function"].get("parameters")
    if params and params.get("type", "object") != "object":
        raise ValueError(f"the parameters of tool {tool['function']['name']!r} must be a JSON schema of "
                         f"type \"object\", got type {params['type']!r}")  # fmt: skip
    return copy.deepcopy(params) if params else dict(EMPTY_PARAMETERS)


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The schema of a ``required`` answer: a non-empty array of calls to the given tools.

    Each tool's ``$defs`` / ``definitions`` move to the root so ``#/$defs/...`` references
    still resolve once the schema is nested; two tools defining one name differently is a
    ``ValueError``.
    """
    shared: dict[str, dict[str, Any]] = {}
    variants = []
    for tool in tools:
        params = parameters_of(tool)
        for key in ("$defs", "definitions"):
            for name, definition in (params.pop(key, None) or {}).items():
                if shared.setdefault(key, {}).setdefault(name, definition) != definition:
                    raise ValueError(f"tools define the schema {key}/{name} differently; give them distinct names")
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]}, "arguments": params},
                "required": ["name", "arguments"],
            }
        )
    item = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1, **shared}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class RequiredToolParser(ToolParser):
    """Reads the JSON array a ``required`` grammar produces."""

    name = "required"

    def extract(self, text: str, final: bool) -> Extraction:
        out = Extraction()
        i = skip_ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return out
        for call in scan_call_array(text, i).calls:
            if call.name is None:
                break  # the grammar writes the name first; it is still arriving
            arguments = call.final_arguments() if final else call.arguments
            out.calls.append(ToolCall(call.name, arguments, complete=call.end is not None))
        return out


class NamedToolParser(ToolParser):
    """Reads the arguments object a named-function grammar produces (the name is known up front)."""

    name = "named"

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def extract(self, text: str, final: bool) -> Extraction:
        i = skip_ws(text, 0)
        if i >= len(text) or text[i] != "{":
            arguments = "{}" if final else ""
            return Extraction(calls=[ToolCall(self.function_name, arguments, complete=False)])
        scan = scan_object(text, i)
        arguments = scan.canonical(close=final)
        return Extraction(calls=[ToolCall(self.function_name, arguments, complete=scan.end is not None)])
