"""Pythonic tool calls (Llama 3.2 / 4, some fine-tunes): ``[get_weather(city="Paris"), f(n=1)]``.

The whole output is a Python list of calls with keyword arguments whose values are literals;
each is reported once its closing parenthesis arrives (a call is settled only then: a
literal is not JSON until it is complete), arguments converted to JSON. Output that is not
such a list is content.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from kvik_server.tool_parsers.base import Extraction, ToolCall, ToolParser
from kvik_server.tool_parsers.json_scan import dumps, skip_ws

_NAME = re.compile(r"[A-Za-z_][\w.]*")
PYTHON_START = "<|python_start|>"  # Llama 4 may open its calls with this (when special tokens are kept)


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def extract(self, text: str, final: bool) -> Extraction:
        out = Extraction()
        i = skip_ws(text, 0)
        if text.startswith(PYTHON_START, i):
            i = skip_ws(text, i + len(PYTHON_START))
        elif PYTHON_START.startswith(text[i:]) and not final:
            return out
        if i >= len(text):
            return out
        if text[i] != "[":
            out.content = text
            return out
        j = i + 1
        while True:
            j = skip_ws(text, j)
            if j >= len(text):
                return self._give_back(out, text, j, final)
            if text[j] == "]":
                out.content += text[j + 1 :]
                return out
            name = _NAME.match(text, j)
            if name is None or (name.end() < len(text) and text[name.end()] != "("):
                return self._give_back(out, text, j, True)
            close = call_end(text, name.end()) if name.end() < len(text) else None
            if close is None:
                return self._give_back(out, text, j, final)
            parsed = parse_call(text[j:close])
            if parsed is None:
                return self._give_back(out, text, j, True)
            out.calls.append(ToolCall(parsed[0], parsed[1], complete=True))
            j = skip_ws(text, close)
            if j < len(text) and text[j] == ",":
                j += 1
            elif j < len(text) and text[j] != "]":
                return self._give_back(out, text, j, True)

    @staticmethod
    def _give_back(out: Extraction, text: str, at: int, settled: bool) -> Extraction:
        """Stop at ``text[at]``: when it is certain no call starts there, the text is content
        (all of it if no call was found, so a reply like ``[1] See ...`` is kept whole)."""
        if settled:
            out.content += text if not out.calls else text[at:]
        return out


# What matters for bracket matching: whole string literals (skipped), a quote that opens a string
# not finished yet, and brackets. Unrolled string loops, so each step of a long call costs one
# linear pass in C rather than a Python loop over every character.
_TOKENS = re.compile(
    r'"""[\s\S]*?"""'  # triple-quoted strings (may span lines)
    r"|'''[\s\S]*?'''"
    r'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"'  # one-line strings
    r"|'[^'\\\n]*(?:\\.[^'\\\n]*)*'"
    r"""|["'()\[\]{}]"""  # a string not finished yet, or a bracket
)


def call_end(text: str, open_paren: int) -> int | None:
    """Index just after the ``)`` matching ``text[open_paren]``, or None if it has not arrived."""
    depth = 0
    for token in _TOKENS.finditer(text, open_paren):
        kind = token.group()
        if kind in ("'", '"'):
            return None  # a string literal still being written (or one broken by a newline)
        if kind in "([{":
            depth += 1
        elif kind in ")]}":
            depth -= 1
            if depth == 0:
                return token.end()
    return None


def parse_call(source: str) -> tuple[str, str] | None:
    """``name(k=literal, ...)`` → (name, JSON arguments), or None if it is not such a call."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(node, ast.Call) or node.args or any(kw.arg is None for kw in node.keywords):
        return None
    name = _dotted(node.func)
    if name is None:
        return None
    arguments: dict[str, Any] = {}
    try:
        for kw in node.keywords:
            arguments[str(kw.arg)] = _jsonable(ast.literal_eval(kw.value))
        return name, dumps(arguments)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _jsonable(value: Any) -> Any:
    """Python literals as JSON values (tuples become lists); TypeError for sets, bytes, complex ..."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("JSON object keys must be strings")
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        json.dumps(value, allow_nan=False)  # ValueError for NaN and infinity
        return value
    raise TypeError(f"{type(value).__name__} is not a JSON value")
