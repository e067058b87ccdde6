"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: ``{"name": ..., "parameters": {...}}`` as the whole output,
optionally after ``<|python_tag|>``, several calls separated by ``;``.

Output that does not start with a JSON object is content. An object that never names a
function is content too (a model answering in JSON), given back once that is certain.
"""

from __future__ import annotations

from kvik_server.tool_parsers.base import Extraction, ToolCall, ToolParser
from kvik_server.tool_parsers.json_scan import scan_call, skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def extract(self, text: str, final: bool) -> Extraction:
        out = Extraction()
        i = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, i):
            i = skip_ws(text, i + len(PYTHON_TAG))
        elif PYTHON_TAG.startswith(text[i:]) and not final:
            return out  # nothing yet, or the tag is still arriving
        if i >= len(text):
            return out
        if text[i] != "{":
            out.content = text
            return out
        while True:
            call = scan_call(text, i)
            if call.name is not None:
                arguments = call.final_arguments() if final else call.arguments
                out.calls.append(ToolCall(call.name, arguments, complete=call.end is not None))
            elif final or call.broken or call.end is not None:
                out.content += text[i:]  # not a call: this object and what follows are content
                return out
            if call.end is None:
                return out
            i = skip_ws(text, call.end)
            if i < len(text) and text[i] == ";":
                i = skip_ws(text, i + 1)
            if i >= len(text):
                return out
            if text[i] != "{":
                out.content += text[i:]
                return out
