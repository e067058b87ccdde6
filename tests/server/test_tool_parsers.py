"""Tool-call parsers on outputs shaped like each model family's: the non-streamed parse is right, and
streaming (token by token, character by character, random chunkings) adds up to exactly it, with
every intermediate state a prefix of the final one (no garbage to take back, nothing leaked)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik_server.tool_parsers.base import ToolCallStream, ToolParser
from kvik_server.tool_parsers.forced import NamedToolParser, RequiredToolParser
from kvik_server.tool_parsers.hermes import HermesToolParser
from kvik_server.tool_parsers.llama3_json import Llama3JsonToolParser
from kvik_server.tool_parsers.mistral import MistralToolParser
from kvik_server.tool_parsers.pythonic import PythonicToolParser

WEATHER = {"location": "San Francisco, CA", "unit": "celsius"}
# (parser, output as the model family writes it, expected content, expected [(name, arguments)])
CASES: list[tuple[ToolParser, str, str, list[tuple[str, dict[str, Any]]]]] = [
    (HermesToolParser(), '<tool_call>\n{"name": "get_weather", "arguments": {"location": "San Francisco, CA", '
     '"unit": "celsius"}}\n</tool_call>', "", [("get_weather", WEATHER)]),
    (HermesToolParser(), 'I will look both up.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"location": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'
     "\n</tool_call>", "I will look both up.", [("get_weather", {"location": "Paris"}),
                                                ("get_time", {"tz": "Europe/Paris"})]),
    (HermesToolParser(), 'Tags like <tool_call> are how I call tools, e.g. <tool_call>oops</tool_call>.',
     "Tags like <tool_call> are how I call tools, e.g. <tool_call>oops</tool_call>.", []),
    (HermesToolParser(), '<tool_call>\n{"arguments": {"q": "é \\"x\\" {}"}, "name": "search"}\n</tool_call>',
     "", [("search", {"q": 'é "x" {}'})]),
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": "{\\"n\\": 1}"}</tool_call>', "", [("f", {"n": 1})]),
    (HermesToolParser(), '<tool_call>{"name": "write", "arguments": {"path": "a.py", "code": "def f():\\n    return '
     '\\"\\u00e9\\ud83d\\ude00\\"\\n"}}</tool_call>', "",
     [("write", {"path": "a.py", "code": 'def f():\n    return "é😀"\n'})]),
    (Llama3JsonToolParser(), '{"name": "get_weather", "parameters": {"location": "San Francisco, CA", "unit": '
     '"celsius"}}', "", [("get_weather", WEATHER)]),
    (Llama3JsonToolParser(), '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": '
     '{"location": "Paris"}}; {"name": "get_time", "parameters": {}}', "",
     [("get_weather", {"location": "Paris"}), ("get_time", {})]),
    (Llama3JsonToolParser(), "The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    (Llama3JsonToolParser(), '{"answer": 42}', '{"answer": 42}', []),
    (MistralToolParser(), '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "San Francisco, CA", '
     '"unit": "celsius"}}, {"name": "get_time", "arguments": {"tz": "PST"}}]', "",
     [("get_weather", WEATHER), ("get_time", {"tz": "PST"})]),
    (MistralToolParser(), 'Checking.[TOOL_CALLS]get_weather[ARGS]{"location": "San Francisco, CA", "unit": '
     '"celsius"}', "Checking.", [("get_weather", WEATHER)]),
    (MistralToolParser(), "No tools needed: [1, 2, 3].", "No tools needed: [1, 2, 3].", []),
    (PythonicToolParser(), '[get_weather(location="San Francisco, CA", unit="celsius"), get_time(tz=\'P)ST\', '
     'extra={"a": (1, 2), "b": None, "c": True})]', "",
     [("get_weather", WEATHER), ("get_time", {"tz": "P)ST", "extra": {"a": [1, 2], "b": None, "c": True}})]),
    (PythonicToolParser(), "[1] Smith et al. found that ...", "[1] Smith et al. found that ...", []),
    (PythonicToolParser(), "[f(1, 2)]", "[f(1, 2)]", []),  # positional arguments are not a tool call
    (RequiredToolParser(), '[{"name": "get_weather", "arguments": {"location": "San Francisco, CA", "unit": '
     '"celsius"}}]', "", [("get_weather", WEATHER)]),
    (NamedToolParser("get_weather"), '{"location": "San Francisco, CA", "unit": "celsius"}', "",
     [("get_weather", WEATHER)]),
]  # fmt: skip
IDS = [f"{type(c[0]).__name__}-{i}" for i, c in enumerate(CASES)]


def streamed(parser: ToolParser, text: str, cuts: list[int]) -> tuple[str, list[list[str]], list[str]]:
    """Feed ``text`` cut at ``cuts``; return (content, [[name, arguments]], ids) from the deltas alone,
    checking at every step that what was sent is a prefix of the final parse."""
    final = parser.extract(text, final=True)
    stream = ToolCallStream(parser)
    content, calls, ids = "", [], []
    points = [*sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    for point in points:
        new_content, deltas = stream.update(text[:point], point == len(text))
        content += new_content
        for delta in deltas:
            if "id" in delta:
                assert delta["index"] == len(calls) and delta["type"] == "function"
                ids.append(delta["id"])
                calls.append([delta["function"]["name"], delta["function"]["arguments"]])
            else:
                assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
                calls[delta["index"]][1] += delta["function"]["arguments"]
        assert final.content.rstrip().startswith(content)
        assert len(calls) <= len(final.calls)
        for (name, arguments), want in zip(calls, final.calls[: len(calls)], strict=True):
            assert name == want.name and want.arguments.startswith(arguments)
    return content, calls, ids


def tokens(text: str) -> list[int]:
    """Cut points of a word-piece tokenization (a stand-in for the model's tokens)."""
    return [m.end() for m in re.finditer(r"\s+|\w+|[^\w\s]", text)]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=IDS)
def test_non_streamed_parse(parser: ToolParser, text: str, content: str, calls: list[Any]) -> None:
    got = parser.extract(text, final=True)
    assert got.content.rstrip() == content
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == calls
    assert all(c.complete for c in got.calls)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=IDS)
@pytest.mark.parametrize("granularity", ["tokens", "characters"])
def test_streamed_equals_non_streamed(parser: ToolParser, text: str, content: str, calls: list[Any],
                                     granularity: str) -> None:  # fmt: skip
    cuts = tokens(text) if granularity == "tokens" else list(range(len(text)))
    got_content, got_calls, ids = streamed(parser, text, cuts)
    assert got_content == content
    assert [(name, json.loads(arguments)) for name, arguments in got_calls] == calls
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == len(ids)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), data=st.data())
def test_random_chunkings(case: Any, data: st.DataObject) -> None:
    parser, text, content, calls = case
    cuts = data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=12))
    got_content, got_calls, _ = streamed(parser, text, cuts)
    assert got_content == content
    assert [(name, json.loads(arguments)) for name, arguments in got_calls] == calls


@settings(max_examples=80, deadline=None)
@given(case=st.sampled_from(CASES), data=st.data())
def test_cut_off_outputs_still_give_valid_arguments(case: Any, data: st.DataObject) -> None:
    """max_tokens can end the output anywhere: every call's arguments still parse as a JSON object,
    and streaming the cut-off output adds up to its non-streamed parse."""
    parser, text, _, _ = case
    end = data.draw(st.integers(0, len(text)))
    cuts = data.draw(st.lists(st.integers(1, max(1, end)), max_size=8))
    final = parser.extract(text[:end], final=True)
    for call in final.calls:
        assert isinstance(json.loads(call.arguments), dict)
    got_content, got_calls, _ = streamed(parser, text[:end], cuts)
    assert got_content == final.content.rstrip()
    assert got_calls == [[c.name, c.arguments] for c in final.calls]


# Fragments that exercise every parser's markers and JSON edge cases, shuffled into arbitrary text.
FRAGMENTS = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "{", "}", "[", "]", ",",
             ";", ":", '"name"', '"arguments"', '"parameters"', '"f"', '"a\\"b"', "1", "-2.5e3", "true", "null",
             " ", "\n", "text", "f(", ")", "x=1", "'s'", "é", '"a', "\\u00e9", "\\ud83d", "\\ude00", "\\",
             "\\n", "\\x", "\t"]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(parser=st.sampled_from([c[0] for c in CASES]), pieces=st.lists(st.sampled_from(FRAGMENTS), max_size=30),
       data=st.data())  # fmt: skip
def test_any_text_streams_consistently(parser: ToolParser, pieces: list[str], data: st.DataObject) -> None:
    """Whatever a model writes, the parser never takes back what it streamed and never emits invalid JSON."""
    text = "".join(pieces)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(text))), max_size=10))
    final = parser.extract(text, final=True)
    got_content, got_calls, _ = streamed(parser, text, cuts)
    assert got_content == final.content.rstrip()
    assert got_calls == [[c.name, c.arguments] for c in final.calls]
    for call in final.calls:
        assert isinstance(json.loads(call.arguments), dict)


def test_long_string_arguments_stream_as_they_are_written() -> None:
    """A string argument (code, a document) is not held back until it ends: it streams in pieces."""
    code = "".join(f"line {i} = {i} * 2\\n" for i in range(40))
    text = '<tool_call>{"name": "write", "arguments": {"path": "x.py", "code": "' + code + '"}}</tool_call>'
    stream = ToolCallStream(HermesToolParser())
    pieces = []
    for point in tokens(text):
        for delta in stream.update(text[:point], point == len(text))[1]:
            pieces.append(delta["function"]["arguments"])
    assert len(pieces) > 40  # one per token of the code, roughly
    assert json.loads("".join(pieces)) == {"path": "x.py", "code": code.replace("\\n", "\n")}
    cut = HermesToolParser().extract(text[: len(text) // 2], final=True).calls[0].arguments
    assert json.loads(cut)["path"] == "x.py"  # cut off mid-string: closed into valid JSON


def test_long_outputs_are_not_re_parsed_on_every_token() -> None:
    """Extraction reads the whole text; a 20k-character call must not cost one extraction per token."""

    class Counting(HermesToolParser):
        calls = 0

        def extract(self, text: str, final: bool) -> Any:
            Counting.calls += 1
            return super().extract(text, final)

    code = "x = 1\\n" * 3500
    text = '<tool_call>{"name": "write", "arguments": {"code": "' + code + '"}}</tool_call>'
    stream, pieces = ToolCallStream(Counting()), []
    points = range(4, len(text) + 4, 4)
    for point in points:
        pieces += [d["function"]["arguments"] for d in stream.update(text[:point], point >= len(text))[1]]
    assert json.loads("".join(pieces)) == {"code": code.replace("\\n", "\n")}
    assert Counting.calls < len(points) / 4 and len(pieces) > 500  # still streamed in many pieces
