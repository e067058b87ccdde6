"""Tool-call parsers: model output → content + OpenAI tool calls, streamed without garbage.

See :mod:`kvik_server.tool_parsers.base` for the contract every parser keeps, and
``docs/tool_calling.md`` for the formats and the plugin hook.
"""

from kvik_server.tool_parsers.base import Extraction, ToolCall, ToolCallStream, ToolParser

__all__ = ["Extraction", "ToolCall", "ToolCallStream", "ToolParser"]
