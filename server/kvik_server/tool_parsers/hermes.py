"""Hermes / Qwen 2.5 / Qwen 3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one tag per call.

Text outside the tags is content. A tag whose JSON never names a function (or is not JSON)
is given back as content once that is certain, so nothing the model wrote is lost.
"""

from __future__ import annotations

from kvik_server.tool_parsers.base import Extraction, ToolCall, ToolParser, held_back
from kvik_server.tool_parsers.json_scan import scan_call, skip_ws


class HermesToolParser(ToolParser):
    name = "hermes"
    open_tag = "<tool_call>"
    close_tag = "</tool_call>"

    def extract(self, text: str, final: bool) -> Extraction:
        out = Extraction()
        pos = 0
        while True:
            start = text.find(self.open_tag, pos)
            if start < 0:
                tail = text[pos:]
                out.content += tail if final else tail[: len(tail) - held_back(tail, self.open_tag)]
                return out
            out.content += text[pos:start]
            body = skip_ws(text, start + len(self.open_tag))
            if body >= len(text):
                return out  # an empty tag at the very end is dropped
            if text[body] != "{":  # not a call after all: the tag is literal text
                out.content += text[start:body]
                pos = body
                continue
            call = scan_call(text, body)
            if call.name is not None:
                arguments = call.final_arguments() if final else call.arguments
                out.calls.append(ToolCall(call.name, arguments, complete=call.end is not None))
            if call.end is None and not call.broken:
                if final and call.name is None:
                    out.content += text[start:]  # the output ended inside a nameless call
                return out  # still being written (or cut off: the call keeps what was settled)
            if call.end is None or call.name is None:
                # Broken JSON, or an object naming no function: resume after the close tag.
                close = text.find(self.close_tag, body)
                if close < 0:
                    if final and call.name is None:
                        out.content += text[start:]
                    return out
                if call.name is None:
                    out.content += text[start : close + len(self.close_tag)]
                pos = close + len(self.close_tag)
                continue
            after = skip_ws(text, call.end)
            if text.startswith(self.close_tag, after):
                pos = after + len(self.close_tag)
            elif self.close_tag.startswith(text[after:]):
                return out  # the close tag is still coming (or the text ended without it)
            else:
                pos = after  # text after the object without a close tag: go on parsing it
