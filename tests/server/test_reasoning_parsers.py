"""Reasoning parsers (``<think>``) alone and under a tool parser, non-streamed and streamed in any chunking;
how a choice's output is cleaned before parsing."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik_server.chat_output import ChoiceOutput, OutputPlan
from kvik_server.reasoning.base import ReasoningParser
from kvik_server.reasoning.think import DeepSeekR1ReasoningParser, Qwen3ReasoningParser
from kvik_server.tool_parsers.hermes import HermesToolParser

R1, QWEN3 = DeepSeekR1ReasoningParser(), Qwen3ReasoningParser()
# (parser, output, reasoning, content)
CASES: list[tuple[ReasoningParser, str, str, str]] = [
    (QWEN3, "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help?",
     "The user greets me. I should greet back.", "Hello! How can I help?"),
    (QWEN3, "Hello! How can I help?", "", "Hello! How can I help?"),  # enable_thinking=False
    (QWEN3, "<think>\n\n</think>\n\nHi.", "", "Hi."),
    (QWEN3, "<think>Still thinking when max_tokens hit", "Still thinking when max_tokens hit", ""),
    (R1, "Okay, 2+2 is 4, and < or > signs are fine.\n</think>\n\nThe answer is 4.",
     "Okay, 2+2 is 4, and < or > signs are fine.", "The answer is 4."),  # <think> was in the prompt
    (R1, "<think>\nHmm.\n</think>The answer is 4.", "Hmm.", "The answer is 4."),
    (R1, "Cut off mid-thought </thi", "Cut off mid-thought </thi", ""),
]  # fmt: skip


def stream(parser: ReasoningParser, text: str, cuts: list[int]) -> tuple[str, str]:
    output = ChoiceOutput(OutputPlan(reasoning_parser=parser))
    reasoning = content = ""
    for point in [*sorted({c for c in cuts if 0 < c < len(text)}), len(text)]:
        delta = output.delta(text[:point], point == len(text))
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
    return reasoning, content


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), CASES)
def test_split(parser: ReasoningParser, text: str, reasoning: str, content: str) -> None:
    message, _ = ChoiceOutput(OutputPlan(reasoning_parser=parser)).message(text, "stop")
    assert (message["reasoning_content"] or "", message["content"]) == (reasoning, content)
    assert stream(parser, text, list(range(len(text)))) == (reasoning, content)


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(CASES), data=st.data())
def test_random_chunkings_and_cut_offs(case: Any, data: st.DataObject) -> None:
    parser, text, _, _ = case
    end = data.draw(st.integers(0, len(text)))
    cuts = data.draw(st.lists(st.integers(1, max(1, end)), max_size=10))
    final = parser.split(text[:end], final=True)
    assert stream(parser, text[:end], cuts) == (final.reasoning, final.content)


def test_tool_calls_are_parsed_after_the_reasoning() -> None:
    text = ('<think>\nI could write <tool_call>{"name": "wrong", "arguments": {}}</tool_call> but should not.\n'
            '</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')  # fmt: skip
    plan = OutputPlan(tool_parser=HermesToolParser(), reasoning_parser=QWEN3)
    message, finish = ChoiceOutput(plan).message(text, "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert "wrong" in message["reasoning_content"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Oslo"})
    ]
    output = ChoiceOutput(plan)
    deltas = [output.delta(text[:i], i == len(text)) for i in range(1, len(text) + 1)]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert not any("content" in d for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Oslo"}
    assert output.finish_reason("stop") == "tool_calls"


class _Tokenizer:
    """``</think>`` is token 99 (as in Qwen3's vocabulary); other text encodes one token per word."""

    unk_token_id = 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return 99 if token == "</think>" else 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1] * len(text.split())


def test_reasoning_tokens_counted_up_to_the_end_marker() -> None:
    split = QWEN3.split("<think>a b c</think>answer", final=True)
    assert QWEN3.count_reasoning_tokens([5, 6, 7, 8, 99, 10], _Tokenizer(), split) == 5
    assert QWEN3.count_reasoning_tokens([10, 11], _Tokenizer(), QWEN3.split("answer", final=True)) == 0
    cut_off = QWEN3.split("<think>a b", final=True)
    assert QWEN3.count_reasoning_tokens([5, 6, 7], _Tokenizer(), cut_off) == 3
    no_marker_token = SimpleNamespace(unk_token_id=0, convert_tokens_to_ids=lambda t: 0, encode=_Tokenizer().encode)
    assert QWEN3.count_reasoning_tokens([5, 6, 7, 8], no_marker_token, split) == 3  # re-encoded estimate


def test_end_of_sequence_text_is_not_content() -> None:
    """Parsers that need special tokens (mistral) see the EOS token's text at the end: it is dropped."""
    from kvik_server.tool_parsers.mistral import MistralToolParser

    plan = OutputPlan(tool_parser=MistralToolParser(), trailing_special=("</s>",))
    text = '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]</s>'
    message, finish = ChoiceOutput(plan).message(text, "stop")
    assert message["content"] is None and finish == "tool_calls"
    assert ChoiceOutput(plan).message("Hello.</s>", "stop")[0]["content"] == "Hello."
    output = ChoiceOutput(plan)
    deltas = [output.delta("Hello.", False), output.delta("Hello.</s>", True)]
    assert "".join(d.get("content", "") for d in deltas) == "Hello."


def test_no_reasoning_parsing_under_a_grammar() -> None:
    """response_format / guided_* hold from the first token: deepseek_r1 would call the JSON "reasoning"."""
    from kvik_server.chat_output import ParserSettings, plan_output
    from kvik_server.protocol import ChatCompletionRequest

    settings = ParserSettings(reasoning_parser="deepseek_r1")
    ask = {"messages": [{"role": "user", "content": "x"}]}
    assert plan_output(ChatCompletionRequest.model_validate(ask), settings).reasoning_parser is not None
    text_format = {**ask, "response_format": {"type": "text"}}
    assert plan_output(ChatCompletionRequest.model_validate(text_format), settings).reasoning_parser is not None
    for extra in ({"response_format": {"type": "json_object"}}, {"guided_regex": "[a-z]+"}):
        plan = plan_output(ChatCompletionRequest.model_validate({**ask, **extra}), settings)
        assert plan.reasoning_parser is None and not plan.active


class _ThinkVocab:
    """``<think>`` is token 98 and ``</think>`` 99, as single vocabulary tokens."""

    unk_token_id = 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<think>": 98, "</think>": 99}.get(token, 0)


def test_an_r1_style_model_thinks_before_its_tool_grammar() -> None:
    """The prompt ends inside <think> (R1's template): the grammar waits for </think>, the thought is
    reasoning_content and the calls are parsed from what follows."""
    from kvik_server.chat_output import ParserSettings, apply_plan, plan_output, think_before_grammar
    from kvik_server.protocol import ChatCompletionRequest

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [tool], "tool_choice": "required"}
    )
    settings = ParserSettings(reasoning_parser="deepseek_r1")
    plan = plan_output(body, settings)
    params = apply_plan(body.to_sampling_params(50), plan)
    assert plan.reasoning_parser is None  # nothing to parse until the prompt says the model will think
    gated = think_before_grammar(params, plan, [5, 6, 98, 7], _ThinkVocab())
    assert gated.guided_after_token_id == 99 and gated.guided_json == params.guided_json
    message, finish = ChoiceOutput(plan).message('I should call f.\n</think>[{"name": "f", "arguments": {}}]', "stop")
    assert message["reasoning_content"] == "I should call f." and finish == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["f"]

    for prompt in ([5, 6, 7], [98, 1, 99, 7]):  # never opened, or already closed (thinking turned off)
        plan = plan_output(body, settings)
        assert think_before_grammar(params, plan, prompt, _ThinkVocab()).guided_after_token_id is None
        assert plan.reasoning_parser is None
    plan = plan_output(body, ParserSettings(reasoning_parser="qwen3"))  # qwen3 output opens <think> itself
    assert think_before_grammar(params, plan, [98], _ThinkVocab()).guided_after_token_id is None
    plan = plan_output(body, settings)
    assert think_before_grammar(params, plan, [98], SimpleNamespace(convert_tokens_to_ids=lambda t: 0,
                                                                    unk_token_id=0)).guided_after_token_id is None  # fmt: skip
