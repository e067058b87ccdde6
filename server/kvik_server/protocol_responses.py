"""The Responses API request (POST /v1/responses) and its input items as chat messages.

kvik serves the Responses API on its chat machinery: ``input`` items (and the stored
conversation of ``previous_response_id``) become chat messages, the request becomes a
``ChatCompletionRequest``, and the chat answer becomes output items. Fields kvik does not
implement are accepted only with their neutral value, as on the other routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from kvik_server.errors import bad_request
from kvik_server.protocol import OpenAIModel

TEXT_PARTS = ("input_text", "output_text", "text")


class FunctionTool(OpenAIModel):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Accepted with their neutral values only.
    text: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None
    include: Annotated[list[str], Field(max_length=0)] | None = None

    @field_validator("text")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value != {"format": {"type": "text"}}:
            raise ValueError('only {"format": {"type": "text"}} is supported')
        return value

    def chat_body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The equivalent /v1/chat/completions body (validated by the caller)."""
        body: dict[str, Any] = {"messages": messages, "parallel_tool_calls": self.parallel_tool_calls}
        if self.model is not None:
            body["model"] = self.model
        for name, value in (("max_completion_tokens", self.max_output_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p)):  # fmt: skip
            if value is not None:
                body[name] = value
        if self.tools:
            body["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in self.tools
            ]
        if isinstance(self.tool_choice, FunctionToolChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        return body


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses ``input`` → chat messages (dicts ChatMessage accepts); 400 naming the bad item."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message" if "role" in item else None)
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role must be user, system, developer or assistant, got {role!r}.",
                                  param=where)  # fmt: skip
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}  # fmt: skip
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # parallel calls: one assistant turn
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": output if isinstance(output, str) else _text(output, where)})  # fmt: skip
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again (as with reasoning_content)
        else:
            raise bad_request(
                f"{where} has type {kind!r}; kvik accepts message, function_call, function_call_output and "
                "reasoning items.",
                param=where,
            )
    return messages


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string.", param=f"{where}.{key}")
    return value


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of text parts.", param=where)
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{where}.content has a {kind!r} part; kvik serves text-only models (input_text).",
                              param=where)  # fmt: skip
        texts.append(part["text"])
    return "\n".join(texts)
