"""Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3 tokenizers) or
``[TOOL_CALLS]name[ARGS]{...}`` (v11+), text before the marker being content.

``[TOOL_CALLS]`` is a special token, so this parser asks for output decoded with special
tokens kept. A call object in the list that names no function is skipped; an array that
stops being valid JSON ends the calls (what follows it is dropped).
"""

from __future__ import annotations

from kvik_server.tool_parsers.base import Extraction, ToolCall, ToolParser, held_back
from kvik_server.tool_parsers.json_scan import scan_call_array, scan_object, skip_ws

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True

    def extract(self, text: str, final: bool) -> Extraction:
        out = Extraction()
        pos = 0
        while True:
            start = text.find(TOOL_CALLS, pos)
            if start < 0:
                tail = text[pos:]
                out.content += tail if final else tail[: len(tail) - held_back(tail, TOOL_CALLS)]
                return out
            out.content += text[pos:start]
            i = skip_ws(text, start + len(TOOL_CALLS))
            if i >= len(text):
                return out
            if text[i] == "[":
                array = scan_call_array(text, i)
                for call in array.calls:
                    if call.name is not None:
                        arguments = call.final_arguments() if final else call.arguments
                        out.calls.append(ToolCall(call.name, arguments, complete=call.end is not None))
                    elif call.end is None:
                        return out  # its name may still come
                if array.end is None:
                    return out
                pos = array.end
                continue
            marker = text.find(ARGS, i)
            if marker < 0:
                if final:
                    out.content += text[start:]  # no [ARGS]: not a call
                return out
            name = text[i:marker].strip()
            body = skip_ws(text, marker + len(ARGS))
            if body >= len(text) or text[body] != "{":
                out.calls.append(ToolCall(name, "{}" if final else "", complete=False))
                if body >= len(text):
                    return out
                pos = body  # arguments that are not an object: what follows is content
                continue
            scan = scan_object(text, body)
            out.calls.append(ToolCall(name, scan.canonical(close=final), complete=scan.end is not None))
            if scan.end is None:
                return out
            pos = scan.end
