"""From a chat request's tools / tool_choice and the server's parsers to what each choice returns.

``plan_output`` decides, before generation, how the tools reach the chat template, which
grammar (if any) constrains decoding, and which parsers read the output. ``ChoiceOutput``
then turns one choice's text into a message (``reasoning_content``, ``content``,
``tool_calls``) or, streaming, into deltas whose concatenation is that same message.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvik.sampling_params import SamplingParams, StructuredOutputsParams

from kvik_server.errors import bad_request
from kvik_server.parsers import load_parser
from kvik_server.reasoning.base import ReasoningParser, ReasoningSplit, single_token_id
from kvik_server.tool_parsers.base import ToolCall, ToolCallStream, ToolParser, message_tool_calls, visible_content
from kvik_server.tool_parsers.forced import NamedToolParser, RequiredToolParser, parameters_of, required_schema


@dataclass(slots=True)
class ParserSettings:
    """The server's ``--enable-auto-tool-choice``, ``--tool-call-parser`` and ``--reasoning-parser``."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    @classmethod
    def of(cls, settings: Any) -> ParserSettings:
        """From ServerSettings (or any object with these attribute names)."""
        return cls(bool(getattr(settings, "enable_auto_tool_choice", False)),
                   getattr(settings, "tool_call_parser", None), getattr(settings, "reasoning_parser", None))  # fmt: skip

    def validate(self) -> None:
        """``ValueError`` for an unknown parser name or auto tool choice without a parser (at startup)."""
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (e.g. hermes, llama3_json)")
        if self.tool_call_parser:
            _parser_class("tool parser", self.tool_call_parser)
        if self.reasoning_parser:
            _parser_class("reasoning parser", self.reasoning_parser)


@functools.lru_cache(maxsize=32)
def _parser_class(kind: str, name: str) -> Any:
    return load_parser(kind, name)


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _structured(body: Any) -> bool:
    """Whether the request constrains its output with a grammar (response_format other than text, guided_*)."""
    fmt = getattr(body, "response_format", None)
    if fmt is not None and getattr(fmt, "type", "text") != "text":
        return True
    return any(getattr(body, name, None) is not None for name in GUIDED_FIELDS)


@dataclass(slots=True)
class OutputPlan:
    template_tools: list[dict[str, Any]] | None = None  # `tools=` for apply_chat_template
    guided_json: dict[str, Any] | None = None  # the grammar of a required / named tool choice
    tool_parser: ToolParser | None = None
    reasoning_parser: ReasoningParser | None = None
    parallel: bool = True
    # With special tokens kept, the end-of-sequence token's text ends the output: not content.
    trailing_special: tuple[str, ...] = ()
    # The server's reasoning parser, held back because a grammar constrains this request.
    grammar_reasoning: ReasoningParser | None = None

    @property
    def active(self) -> bool:
        return self.tool_parser is not None or self.reasoning_parser is not None

    @property
    def keep_special_tokens(self) -> bool:
        return self.tool_parser is not None and self.tool_parser.needs_special_tokens


def plan_output(body: Any, settings: ParserSettings, tokenizer: Any = None) -> OutputPlan:
    """The plan for a chat request (``body`` has tools, tool_choice, parallel_tool_calls); 400s for
    a tool_choice the request or the server cannot honour."""
    plan = _plan(body, settings)
    if plan.keep_special_tokens and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token", None)
        plan.trailing_special = (eos,) if isinstance(eos, str) and eos else ()
    return plan


def _plan(body: Any, settings: ParserSettings) -> OutputPlan:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    plan = OutputPlan(parallel=body.parallel_tool_calls)
    structured = _structured(body)
    if settings.reasoning_parser:
        parser = _parser_class("reasoning parser", settings.reasoning_parser)()
        # Under a grammar there is reasoning only if think_before_grammar lets the model think first.
        if structured:
            plan.grammar_reasoning = parser
        else:
            plan.reasoning_parser = parser
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs a non-empty `tools` list.", param="tool_choice")
        return plan
    if choice is None:
        choice = "auto" if settings.enable_auto_tool_choice else "none"
    if choice == "none":
        return plan  # the model is not told about the tools, so it cannot call them
    plan.template_tools = tools
    if choice == "auto":
        if not (settings.enable_auto_tool_choice and settings.tool_call_parser):
            raise bad_request(
                '"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                '--tool-call-parser NAME; use tool_choice "required" or a named function, which work on any server.',
                param="tool_choice",
            )
        plan.tool_parser = _parser_class("tool parser", settings.tool_call_parser)()
        return plan
    if structured:
        raise bad_request(
            f"tool_choice {_describe(choice)} constrains the output itself; drop response_format / guided_*.",
            param="tool_choice",
        )
    # The tool grammar constrains the output too: reasoning only through think_before_grammar.
    plan.grammar_reasoning, plan.reasoning_parser = plan.reasoning_parser, None
    if choice == "required":
        try:
            plan.guided_json = required_schema(tools, body.parallel_tool_calls)
        except ValueError as exc:
            raise bad_request(str(exc), param="tools") from None
        plan.tool_parser = RequiredToolParser()
        return plan
    name = choice.function.name
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    if tool is None:
        known = ", ".join(t["function"]["name"] for t in tools)
        raise bad_request(f"tool_choice names the function {name!r}, which is not in `tools` ({known}).",
                          param="tool_choice")  # fmt: skip
    try:
        plan.guided_json = parameters_of(tool)
    except ValueError as exc:
        raise bad_request(str(exc), param="tools") from None
    plan.tool_parser = NamedToolParser(name)
    return plan


def apply_plan(params: SamplingParams, plan: OutputPlan) -> SamplingParams:
    """The request's sampling params plus the tool-choice grammar and the parser's special-token needs."""
    changes: dict[str, Any] = {}
    if plan.guided_json is not None:  # the tool grammar (tools with other constraints were refused earlier)
        changes["structured_outputs"] = StructuredOutputsParams(json=plan.guided_json)
    if plan.keep_special_tokens:
        changes["skip_special_tokens"] = False
    return dataclasses.replace(params, **changes) if changes else params


def think_before_grammar(
    params: SamplingParams, plan: OutputPlan, prompt_ids: Sequence[int], tokenizer: Any
) -> SamplingParams:
    """Let a reasoning model finish thinking before its grammar starts, when its prompt leaves it
    thinking (R1-style templates end the prompt with ``<think>``): the constraint then waits for the
    ``</think>`` token (``guided_after_token_id``) and the reasoning parser separates the thought.
    Otherwise the grammar holds from the first token and there is no reasoning to parse."""
    parser = plan.grammar_reasoning
    if parser is None or not parser.starts_in_reasoning or parser.start_marker is None or params.guided is None:
        return params
    start_id = single_token_id(tokenizer, parser.start_marker)
    end_id = single_token_id(tokenizer, parser.end_marker)
    if start_id is None or end_id is None or _last(prompt_ids, start_id) <= _last(prompt_ids, end_id):
        return params
    plan.reasoning_parser = parser
    return dataclasses.replace(params, guided_after_token_id=end_id)


def _last(ids: Sequence[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


def _describe(choice: Any) -> str:
    return f'"{choice}"' if isinstance(choice, str) else f"function {choice.function.name!r}"


@dataclass(slots=True)
class Parsed:
    reasoning: str | None
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    split: ReasoningSplit | None = None


class ChoiceOutput:
    """One choice's text → message, or → stream deltas (see the module docstring)."""

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self._tools = ToolCallStream(plan.tool_parser) if plan.tool_parser is not None else None
        self._reasoning_sent = 0
        self._content_sent = 0

    def _clean(self, text: str) -> str:
        for special in self.plan.trailing_special:
            if text.endswith(special):
                return text[: -len(special)]
        return text

    def parse(self, text: str, final: bool) -> Parsed:
        text = self._clean(text)
        split = None
        reasoning: str | None = None
        content = text
        if self.plan.reasoning_parser is not None:
            split = self.plan.reasoning_parser.split(text, final)
            reasoning, content = split.reasoning, split.content
        parsed = Parsed(reasoning, content, split=split)
        if self.plan.tool_parser is not None:
            got = self.plan.tool_parser.extract(content, final)
            parsed.content = visible_content(got.content, final)
            parsed.calls = got.calls if self.plan.parallel else got.calls[:1]
        return parsed

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The non-streamed message and finish reason (``tool_calls`` when the model stopped after calls)."""
        parsed = self.parse(text, final=True)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content, "refusal": None}
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning or None
        if self.plan.tool_parser is not None:
            message["tool_calls"] = message_tool_calls(parsed.calls)
            if parsed.calls:
                message["content"] = parsed.content or None
                if finish_reason == "stop":
                    finish_reason = "tool_calls"
        return message, finish_reason

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """What is new since the last call, as a chat-chunk ``delta`` (empty when nothing is)."""
        delta: dict[str, Any] = {}
        content = text = self._clean(text)
        if self.plan.reasoning_parser is not None:
            split = self.plan.reasoning_parser.split(text, final)
            if len(split.reasoning) > self._reasoning_sent:
                delta["reasoning_content"] = split.reasoning[self._reasoning_sent :]
                self._reasoning_sent = len(split.reasoning)
            content = split.content
        if self._tools is not None:
            new_content, calls = self._tools.update(content, final)
            if not self.plan.parallel:
                calls = [c for c in calls if c["index"] == 0]
            if new_content:
                delta["content"] = new_content
            if calls:
                delta["tool_calls"] = calls
        elif len(content) > self._content_sent:
            delta["content"] = content[self._content_sent :]
            self._content_sent = len(content)
        return delta

    def finish_reason(self, finish_reason: str | None) -> str | None:
        if finish_reason == "stop" and self._tools is not None and self._tools.num_calls:
            return "tool_calls"
        return finish_reason

    def reasoning_tokens(self, text: str, token_ids: Sequence[int], tokenizer: Any) -> int:
        if self.plan.reasoning_parser is None:
            return 0
        split = self.plan.reasoning_parser.split(text, final=True)
        return self.plan.reasoning_parser.count_reasoning_tokens(token_ids, tokenizer, split)


def template_tool_calls(calls: list[Any]) -> list[dict[str, Any]]:
    """History tool calls for a chat template: arguments as a dict (templates ``tojson`` them)."""
    out = []
    for call in calls:
        try:
            arguments: Any = json.loads(call.function.arguments)
        except (json.JSONDecodeError, RecursionError):
            arguments = call.function.arguments
        out.append({"id": call.id, "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments}})  # fmt: skip
    return out
