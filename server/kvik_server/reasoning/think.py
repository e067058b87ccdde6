"""``<think> ... </think>`` reasoning (DeepSeek-R1, Qwen3, QwQ and their distillations)."""

from __future__ import annotations

from kvik_server.reasoning.base import ReasoningParser, ReasoningSplit
from kvik_server.tool_parsers.base import held_back

START, END = "<think>", "</think>"


class ThinkReasoningParser(ReasoningParser):
    start_marker = START
    end_marker = END

    def split(self, text: str, final: bool) -> ReasoningSplit:
        i = len(text) - len(text.lstrip())
        if text.startswith(START, i):
            body = i + len(START)
        elif not final and START.startswith(text[i:]):
            return ReasoningSplit("", "", False)  # nothing yet, or the opening tag is arriving
        elif self.starts_in_reasoning:
            body = 0
        else:
            return ReasoningSplit("", text.lstrip(), True)  # no reasoning: all answer
        end = text.find(END, body)
        if end < 0:
            # Without the closing tag (still thinking, or cut off by max_tokens) it is all reasoning.
            reasoning = text[body:]
            if not final:
                reasoning = reasoning[: len(reasoning) - held_back(reasoning, END)]
            return ReasoningSplit(reasoning.strip(), "", False)
        return ReasoningSplit(text[body:end].strip(), text[end + len(END) :].lstrip(), True)


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    """DeepSeek-R1: its template ends the prompt with ``<think>\\n``, so output may start mid-thought."""

    name = "deepseek_r1"
    starts_in_reasoning = True


class Qwen3ReasoningParser(ThinkReasoningParser):
    """Qwen3: reasoning only when the output opens ``<think>`` (``enable_thinking=False`` skips it)."""

    name = "qwen3"
