"""Request and response bodies of the OpenAI-compatible API (pydantic, the HTTP boundary only).

Requests forbid unknown fields: a typo such as ``max_token`` is a 400 naming it instead of
being silently ignored. OpenAI fields kvik does not implement are accepted only with their
neutral value (``functions: []``, ``logprobs: false``, ``response_format: {"type": "text"}`` ...),
which some clients always send; any other value is a 400 naming the field.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from kvik.sampling_params import SamplingParams, StructuredOutputsParams
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from kvik_server.chat_template import REQUEST_TEMPLATE_KEY, check_template_kwargs


def _is_neutral(name: str, value: Any) -> bool:
    """True when an unsupported OpenAI field's value asks for nothing kvik would ignore."""
    if value is None or value is False or value == [] or value == {}:
        return True
    if name == "tool_choice":
        return value == "none"
    if name == "parallel_tool_calls":
        return isinstance(value, bool)
    if name == "response_format":
        return value == {"type": "text"}
    if name == "service_tier":
        return value in ("auto", "default")
    if name == "best_of":
        return value == 1
    if name == "suffix":
        return value == ""
    return False


_NEUTRAL_ALLOWED = frozenset(
    {"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format", "audio",
     "modalities", "prediction", "logprobs", "top_logprobs", "best_of", "suffix", "service_tier", "store",
     "metadata", "web_search_options", "tool_calls", "refusal", "annotations"}
)  # fmt: skip


class OpenAIModel(BaseModel):
    """Base of every request body: unknown fields are errors, neutral unsupported ones are dropped."""

    # allow_inf_nan=False: json.loads accepts NaN/Infinity, and a NaN temperature would poison sampling.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = cls.model_fields
            return {k: v for k, v in data.items() if k in known or k not in _NEUTRAL_ALLOWED or not _is_neutral(k, v)}
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaSpec(OpenAIModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    """OpenAI structured output: ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class SamplingFields(OpenAIModel):
    """Fields shared by chat and completions that map onto ``SamplingParams``."""

    model: str | None = None
    n: int = Field(1, le=128)  # OpenAI's cap; also keeps one request from flooding the scheduler
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI does for abuse tracking
    # kvik / vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM extra: per prompt token, non-streaming only
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    # structured output: OpenAI's response_format, or vLLM's guided_* extras (at most one)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM >= 0.10's spelling: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    structured_outputs: dict[str, Any] | None = None

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None = None) -> SamplingParams:
        """Build SamplingParams; ``ValueError`` (naming the field) on a bad value."""
        values: dict[str, Any] = dict(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            seed=self.seed,
            logprobs=logprobs,
        )
        best_of = getattr(self, "best_of", None)  # completions only
        if best_of is not None:
            values["best_of"] = best_of
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("SamplingParams.prompt_logprobs is not supported with stream=true; drop one of them")
        for name in ("bad_words", "allowed_token_ids", "prompt_logprobs"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        constraint = self._structured_outputs()
        if constraint is not None:
            values["structured_outputs"] = constraint
        optional = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty")  # fmt: skip
        for name in optional:
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        if self.logit_bias:
            try:
                values["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError("SamplingParams.logit_bias keys must be token ids (integers as strings)") from None
        return SamplingParams(**values)

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint from structured_outputs, response_format or guided_*."""
        given: list[tuple[str, dict[str, Any]]] = []
        if self.structured_outputs is not None:
            given.append(("structured_outputs", dict(self.structured_outputs)))
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ValueError("SamplingParams.response_format needs json_schema.schema for type json_schema")
            given.append(("response_format", {"json": fmt.json_schema.schema_}))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                given.append((f"guided_{kind}", {kind: value}))
        if not given:
            return None
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise ValueError(f"at most one structured-output constraint may be set, got {names}")
        name, spec = given[0]
        try:
            return StructuredOutputsParams(**spec)
        except TypeError:
            known = "json, regex, choice, grammar, json_object"
            raise ValueError(f"SamplingParams.{name} accepts the keys {known}; got {', '.join(spec)}") from None


def _check_template_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None:
        check_template_kwargs(value)
    return value


def _fold_chat_template(request: Any) -> Any:
    """Pass a body-level ``chat_template`` (vLLM's field) on with the other template arguments."""
    if request.chat_template is not None:
        kwargs = request.chat_template_kwargs or {}
        if kwargs.get(REQUEST_TEMPLATE_KEY) not in (None, request.chat_template):
            raise ValueError("chat_template and chat_template_kwargs.chat_template differ; send one of them")
        request.chat_template_kwargs = {**kwargs, REQUEST_TEMPLATE_KEY: request.chat_template}
    return request


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(OpenAIModel):
    """An assistant message's earlier tool call, sent back in the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: which call this result answers
    reasoning_content: str | None = None  # accepted in histories, not shown to the template

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        # Say what is wrong with a non-text part here: left to the union, pydantic would
        # answer "Input should be a valid string".
        parts = data.get("content") if isinstance(data, dict) else None
        if isinstance(parts, list):
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind in _MEDIA_PARTS:  # an unhashable "type" is pydantic's to refuse
                    raise ValueError(
                        f"{_MEDIA_PARTS[kind]} inputs are not supported: this server's model takes text only "
                        f"(got a content part of type {kind!r}); send the content as text parts or a string"
                    )
        return data

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


_MEDIA_PARTS = {"image_url": "image", "input_image": "image", "image": "image", "input_audio": "audio",
                "audio_url": "audio", "video_url": "video", "file": "file"}  # fmt: skip


class FunctionDefinition(OpenAIModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema for the arguments object
    strict: bool | None = None  # kvik's required / named choices are always schema-exact


class ToolDefinition(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: ToolChoiceFunction


class ContentPart(OpenAIModel):
    """Only text parts: kvik serves text-only models."""

    type: Literal["text"]
    text: str


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # refused unless the server runs with --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None
    # tool calling (docs/tool_calling.md)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    _check_template_kwargs = field_validator("chat_template_kwargs")(_check_template_kwargs)
    _fold_chat_template = model_validator(mode="after")(_fold_chat_template)

    def requested_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None, or how many top alternatives to return per token."""
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("SamplingParams.top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# A batch holds at most 2048 prompts (OpenAI's limit).
Prompt = (
    StrictStr
    | list[StrictInt]
    | Annotated[list[StrictStr], Field(max_length=2048)]
    | Annotated[list[list[StrictInt]], Field(max_length=2048)]
)


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None  # only None or == n (vLLM V1 dropped best_of > n)
    echo: bool = False
    add_special_tokens: bool = True


# -- responses ----------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvik"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {...}}`` (errors.py)."""

    error: ErrorDetail


class HealthProblem(BaseModel):
    status: Literal["unhealthy"]
    reason: str


class TokenizeCompletionRequest(OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(OpenAIModel):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    _check_template_kwargs = field_validator("chat_template_kwargs")(_check_template_kwargs)
    _fold_chat_template = model_validator(mode="after")(_fold_chat_template)


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[StrictInt]


ChatMessage.model_rebuild()
