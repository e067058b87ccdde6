"""POST /v1/completions: one or many prompts (text or token ids) → OpenAI text_completion bodies.

With several prompts every prompt is its own engine request; choice ``index`` is
``prompt_index * n + sample_index`` as in OpenAI and vLLM.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from kvik.outputs import RequestOutput

from kvik_server.context import ServingContext
from kvik_server.errors import APIError, bad_request, sse_error
from kvik_server.logprobs import completion_logprobs, prompt_logprobs_json
from kvik_server.protocol import CompletionRequest
from kvik_server.serving_chat import INTERNAL, SHUTDOWN_ABORT, usage
from kvik_server.streaming import SSE_DONE, ClientDisconnected, SSEResponse, merge, race_disconnect, sse

logger = logging.getLogger(__name__)


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt shapes → a list of single prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("'prompt' is empty; give a string, a list of strings or token ids.", param="prompt")
    if isinstance(prompt[0], (str, list)):
        return list(prompt)
    return [prompt]


async def create_completion(ctx: ServingContext, body: CompletionRequest, raw: Request | None) -> Response:
    lora = ctx.check_model(body.model)
    if body.echo and body.logprobs is not None:
        raise bad_request("echo together with logprobs (prompt logprobs) is not supported; drop one.", param="echo")
    params = ctx.sampling_params(lambda: body.to_sampling_params(body.max_tokens, body.logprobs), body.stream)
    prompts = split_prompts(body.prompt)
    prompt_ids: list[list[int]] = []
    prompt_texts: list[str] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = await ctx.encode(prompt, add_special_tokens=body.add_special_tokens)
            text = prompt
        else:
            ids = list(prompt)
            if body.echo:  # decoding for echo comes before the engine's own vocabulary check
                ctx.check_token_ids(ids, "prompt")
            text = await ctx.decode(ids) if body.echo else ""
        if not ids:
            raise bad_request("The prompt is empty after tokenization; give at least one token.", param="prompt")
        ctx.check_length(len(ids), body.max_tokens, "prompt")
        prompt_ids.append(ids)
        prompt_texts.append(text)
    ctx.admit(params.n, [len(ids) for ids in prompt_ids])
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = [
        ctx.generate(ids, params, f"{request_id}-{i}" if len(prompts) > 1 else request_id, body.priority, lora)
        for i, ids in enumerate(prompt_ids)
    ]
    merged = merge(streams)

    async def close() -> None:
        # merged.aclose() is a no-op if merging never started; the streams' own aclose is not.
        await merged.aclose()
        for stream in streams:
            await stream.aclose()

    num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
    try:
        if body.stream:
            first = await race_disconnect(raw, merged.__anext__())
        else:
            finals = await race_disconnect(raw, _collect_all(merged, len(prompts)))
    except (ClientDisconnected, StopAsyncIteration):
        await close()
        return Response(status_code=499)
    except BaseException:
        await close()
        raise
    if body.stream:
        chunks = _completion_stream(ctx, body, request_id, created, prompt_texts, num_prompt_tokens, first, merged)
        return SSEResponse(chunks, on_close=close)
    choices = []
    for p, final in enumerate(finals):
        for c in final.outputs:
            if c.finish_reason == "abort":
                raise SHUTDOWN_ABORT
            text = prompt_texts[p] + c.text if body.echo else c.text
            logprobs = None if body.logprobs is None else completion_logprobs(c.logprobs or [], body.logprobs, 0)
            choice = {"index": p * body.n + c.index, "text": text, "logprobs": logprobs,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}  # fmt: skip
            if body.prompt_logprobs is not None:  # vLLM's extra field, per choice
                choice["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs)
            choices.append(choice)
    return JSONResponse(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": ctx.served_name(body.model),
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage(num_prompt_tokens, finals),
        }
    )


async def _collect_all(merged: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[RequestOutput]:
    last: dict[int, RequestOutput] = {}
    async for index, output in merged:
        last[index] = output
    return [last[i] for i in range(count)]


async def _completion_stream(
    ctx: ServingContext,
    body: CompletionRequest,
    request_id: str,
    created: int,
    prompt_texts: list[str],
    num_prompt_tokens: int,
    first: tuple[int, RequestOutput],
    merged: AsyncIterator[tuple[int, RequestOutput]],
) -> AsyncIterator[str]:
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    base = {"id": request_id, "object": "text_completion", "created": created, "model": ctx.served_name(body.model),
            "system_fingerprint": None}  # fmt: skip
    n = body.n
    sent = [0] * (n * len(prompt_texts))  # characters of each choice's text already sent
    sent_logprobs = [0] * len(sent)  # positions whose logprobs went out
    echoed = [False] * len(sent)
    done = [False] * len(sent)
    latest: dict[int, RequestOutput] = {}

    def chunk(index: int, text: str, finish: str | None = None, stop_reason: Any = None, logprobs: Any = None) -> str:
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        payload: dict[str, Any] = {**base, "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return sse(payload)

    item: tuple[int, RequestOutput] | None = first
    try:
        while item is not None:
            p, output = item
            latest[p] = output
            for c in output.outputs:
                index = p * n + c.index
                if done[index]:
                    continue
                prefix = ""
                if body.echo and not echoed[index]:
                    echoed[index] = True
                    prefix = prompt_texts[p]
                delta = prefix + c.text[sent[index] :]
                positions = (c.logprobs or [])[sent_logprobs[index] :]
                if delta or (positions and c.finish_reason is not None):
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = completion_logprobs(positions, body.logprobs, sent[index])
                        sent_logprobs[index] += len(positions)
                    sent[index] = len(c.text)
                    yield chunk(index, delta, logprobs=logprobs)
                if c.finish_reason is not None:
                    done[index] = True
                    if c.finish_reason == "abort":
                        raise SHUTDOWN_ABORT
                    yield chunk(index, "", c.finish_reason, c.stop_reason)
            item = await anext(merged, None)
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
        yield sse({**base, "choices": [], "usage": usage(num_prompt_tokens, list(latest.values()))})
    yield SSE_DONE
