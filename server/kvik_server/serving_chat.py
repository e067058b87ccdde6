"""POST /v1/chat/completions: chat template → engine → OpenAI chat.completion(.chunk) bodies."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from kvik.outputs import RequestOutput

from kvik_server.chat_output import (
    ChoiceOutput,
    OutputPlan,
    ParserSettings,
    apply_plan,
    plan_output,
    template_tool_calls,
    think_before_grammar,
)
from kvik_server.context import ServingContext
from kvik_server.errors import INTERNAL_ERROR_MESSAGE, APIError, sse_error
from kvik_server.logprobs import chat_logprobs, prompt_logprobs_json
from kvik_server.protocol import ChatCompletionRequest, ChatMessage
from kvik_server.streaming import SSE_DONE, ClientDisconnected, SSEResponse, collect, race_disconnect, sse

logger = logging.getLogger(__name__)

SHUTDOWN_ABORT = APIError(
    503, "The request was aborted because the server is shutting down; retry it.", code="server_shutting_down"
)
INTERNAL = APIError(500, INTERNAL_ERROR_MESSAGE)


def template_message(message: ChatMessage) -> dict[str, Any]:
    # "developer" is OpenAI's newer name for "system"; chat templates only know the latter.
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = template_tool_calls(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def usage(prompt_tokens: int, outputs: list[RequestOutput], reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI usage: prompt tokens once per prompt, completion tokens summed over all choices."""
    completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in outputs)
    result: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if reasoning_tokens is not None:
        result["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return result


def _reasoning_tokens(ctx: ServingContext, plan: OutputPlan, output: RequestOutput) -> int | None:
    if plan.reasoning_parser is None:
        return None
    return sum(ChoiceOutput(plan).reasoning_tokens(c.text, c.token_ids, ctx.tokenizer) for c in output.outputs)


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, raw: Request | None) -> Response:
    lora = ctx.check_model(body.model)
    max_tokens = body.requested_max_tokens()
    plan = plan_output(body, ParserSettings.of(ctx.settings), ctx.tokenizer)
    params = ctx.sampling_params(lambda: apply_plan(body.to_sampling_params(max_tokens, body.requested_logprobs()),
                                                    plan), body.stream)  # fmt: skip
    template_kwargs = dict(body.chat_template_kwargs or {})
    if plan.template_tools is not None:
        template_kwargs["tools"] = plan.template_tools
    prompt_ids = await ctx.render_chat(
        [template_message(m) for m in body.messages],
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        **template_kwargs,
    )
    ctx.check_length(len(prompt_ids), max_tokens, "messages")
    params = think_before_grammar(params, plan, prompt_ids, ctx.tokenizer)
    ctx.admit(params.n, [len(prompt_ids)])
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = ctx.generate(prompt_ids, params, request_id, body.priority, lora)
    try:
        if body.stream:
            # Pull the first output before the 200 goes out, so engine-side validation
            # errors still get a proper status code.
            first = await race_disconnect(raw, stream.__anext__())
        else:
            final = await race_disconnect(raw, collect(stream))
    except (ClientDisconnected, StopAsyncIteration):
        await stream.aclose()
        return Response(status_code=499)
    except BaseException:
        await stream.aclose()
        raise
    if body.stream:
        chunks = _chat_stream(ctx, body, plan, request_id, created, len(prompt_ids), first, stream)
        return SSEResponse(chunks, on_close=stream.aclose)
    assert final is not None
    if any(c.finish_reason == "abort" for c in final.outputs):
        raise SHUTDOWN_ABORT
    choices = []
    for c in final.outputs:
        message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
        finish_reason: str | None = c.finish_reason
        if plan.active:
            message, finish_reason = ChoiceOutput(plan).message(c.text, finish_reason)
        choices.append({"index": c.index, "message": message, "logprobs": _logprobs(body, c.logprobs or []),
                        "finish_reason": finish_reason, "stop_reason": c.stop_reason})  # fmt: skip
    response = {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": ctx.served_name(body.model),
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage(len(prompt_ids), [final], _reasoning_tokens(ctx, plan, final)),
    }
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs)  # vLLM's extra field
    return JSONResponse(response)


def _logprobs(body: ChatCompletionRequest, positions: list[Any]) -> dict[str, Any] | None:
    if not body.logprobs:
        return None
    return {"content": chat_logprobs(positions, body.top_logprobs or 0), "refusal": None}


async def _chat_stream(
    ctx: ServingContext,
    body: ChatCompletionRequest,
    plan: OutputPlan,
    request_id: str,
    created: int,
    prompt_len: int,
    first: RequestOutput,
    stream: AsyncIterator[RequestOutput],
) -> AsyncIterator[str]:
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and bool(options and options.continuous_usage_stats)
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": ctx.served_name(body.model),
            "system_fingerprint": None}  # fmt: skip
    latest = first

    def chunk(
        index: int, delta: dict[str, Any], finish: str | None = None, stop_reason: Any = None, logprobs: Any = None
    ) -> str:
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        payload: dict[str, Any] = {**base, "choices": [choice]}
        if include_usage:
            payload["usage"] = usage(prompt_len, [latest], _reasoning_tokens(ctx, plan, latest)) if continuous else None
        return sse(payload)

    parsers = [ChoiceOutput(plan) for _ in range(body.n)] if plan.active else None

    for index in range(body.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    sent = [""] * body.n
    sent_logprobs = [0] * body.n  # positions whose logprobs went out with a content delta
    done = [False] * body.n
    try:
        output: RequestOutput | None = first
        while output is not None:
            latest = output
            for c in output.outputs:
                if done[c.index]:
                    continue
                finished = c.finish_reason is not None
                positions = (c.logprobs or [])[sent_logprobs[c.index] :]
                if parsers is not None:  # reasoning / tool calls: only what the parsers settled
                    delta: dict[str, Any] = parsers[c.index].delta(c.text, finished)
                else:
                    text_delta = c.text[len(sent[c.index]) :]
                    sent[c.index] = c.text
                    delta = {"content": text_delta} if text_delta else {}
                if delta or (positions and finished):
                    sent_logprobs[c.index] += len(positions)
                    yield chunk(c.index, delta or {"content": ""}, logprobs=_logprobs(body, positions))
                if finished:
                    done[c.index] = True
                    if c.finish_reason == "abort":
                        raise SHUTDOWN_ABORT
                    finish = parsers[c.index].finish_reason(c.finish_reason) if parsers else c.finish_reason
                    yield chunk(c.index, {}, finish, c.stop_reason)
            output = await anext(stream, None)
    except APIError as exc:
        yield sse_error(exc)
        yield SSE_DONE
        return
    except Exception:
        logger.exception("error while streaming %s", request_id)
        yield sse_error(INTERNAL)
        yield SSE_DONE
        return
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(prompt_len, [latest], _reasoning_tokens(ctx, plan, latest))})
    yield SSE_DONE
