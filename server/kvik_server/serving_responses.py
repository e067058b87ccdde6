"""POST /v1/responses and GET / DELETE /v1/responses/{id}: OpenAI's Responses API on the chat machinery.

The request's ``input`` (after the stored conversation of ``previous_response_id``) and
``instructions`` become chat messages, rendered by the chat template with the tools; the
answer is parsed like a chat answer (tool calls, reasoning) and returned as output items,
or streamed as Responses events (``response.created`` ... ``response.completed``), each
with a ``sequence_number``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from kvik.outputs import RequestOutput
from pydantic import ValidationError

from kvik_server.chat_output import (
    ChoiceOutput,
    OutputPlan,
    ParserSettings,
    apply_plan,
    plan_output,
    think_before_grammar,
)
from kvik_server.context import ServingContext
from kvik_server.errors import APIError, bad_request, validation_error
from kvik_server.protocol import ChatCompletionRequest
from kvik_server.protocol_responses import FunctionToolChoice, ResponsesRequest, input_messages
from kvik_server.response_items import Event, OutputItems
from kvik_server.response_store import ResponseStore
from kvik_server.serving_chat import INTERNAL, SHUTDOWN_ABORT, template_message
from kvik_server.streaming import ClientDisconnected, SSEResponse, collect, race_disconnect

logger = logging.getLogger(__name__)


def not_found(response_id: str, store: ResponseStore) -> APIError:
    return APIError(
        404,
        f"Response with id {response_id!r} not found. kvik keeps responses in memory (created with store: true) "
        f"for {store.ttl_seconds:.0f}s, at most {store.max_entries}, and not across restarts.",
        param="previous_response_id",
        code="response_not_found",
    )


async def create_response(ctx: ServingContext, store: ResponseStore, body: ResponsesRequest, raw: Request) -> Response:
    lora = ctx.check_model(body.model)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise not_found(body.previous_response_id, store)
        history = list(previous.messages)
    conversation = history + input_messages(body.input)
    if not conversation:
        raise bad_request("`input` is empty: give a string or at least one message item.", param="input")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    try:
        chat = ChatCompletionRequest.model_validate(body.chat_body(system + conversation))
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    plan = plan_output(chat, ParserSettings.of(ctx.settings), ctx.tokenizer)
    max_tokens = chat.requested_max_tokens()
    params = ctx.sampling_params(lambda: apply_plan(chat.to_sampling_params(max_tokens), plan), body.stream)
    template_kwargs: dict[str, Any] = {"tools": plan.template_tools} if plan.template_tools is not None else {}
    prompt_ids = await ctx.render_chat([template_message(m) for m in chat.messages], add_generation_prompt=True,
                                       **template_kwargs)  # fmt: skip
    ctx.check_length(len(prompt_ids), max_tokens, "input")
    params = think_before_grammar(params, plan, prompt_ids, ctx.tokenizer)
    ctx.admit(1, [len(prompt_ids)])
    response_id = f"resp_{uuid.uuid4().hex}"
    answer = _Answer(ctx, store, body, plan, response_id, len(prompt_ids), conversation)
    stream = ctx.generate(prompt_ids, params, response_id, lora_request=lora)
    try:
        if body.stream:
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
        return SSEResponse(answer.events(first, stream), on_close=stream.aclose)
    assert final is not None
    if final.outputs[0].finish_reason == "abort":
        raise SHUTDOWN_ABORT
    items = OutputItems()
    c = final.outputs[0]
    items.feed(answer.parser.delta(c.text, True) if plan.active else {"content": c.text})
    items.close(answer.status(c.finish_reason))
    return JSONResponse(answer.finish(items, final))


class _Answer:
    """One response being produced: its skeleton, its events, and storing it when done."""

    def __init__(self, ctx: ServingContext, store: ResponseStore, body: ResponsesRequest, plan: OutputPlan,
                 response_id: str, prompt_len: int, conversation: list[dict[str, Any]]) -> None:  # fmt: skip
        self.ctx, self.store, self.body, self.plan = ctx, store, body, plan
        self.response_id = response_id
        self.prompt_len = prompt_len
        self.conversation = conversation
        self.created_at = int(time.time())
        self.parser = ChoiceOutput(plan)

    @staticmethod
    def status(finish_reason: str | None) -> str:
        return "incomplete" if finish_reason == "length" else "completed"

    def skeleton(self, status: str) -> dict[str, Any]:
        body = self.body
        tool_choice = body.tool_choice
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.ctx.served_name(body.model),
            "output": [],
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": None,
            "store": body.store,
            "temperature": body.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": tool_choice.model_dump()
            if isinstance(tool_choice, FunctionToolChoice)
            else tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def finish(self, items: OutputItems, final: RequestOutput) -> dict[str, Any]:
        """The finished response object; stored when the request asked for it."""
        c = final.outputs[0]
        status = self.status(c.finish_reason)
        response = self.skeleton(status)
        response["output"] = items.items
        if status == "incomplete":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        output_tokens = len(c.token_ids)
        reasoning = self.parser.reasoning_tokens(c.text, c.token_ids, self.ctx.tokenizer)
        response["usage"] = {
            "input_tokens": self.prompt_len,
            # cache_write_tokens: the prompt tokens computed this time, which the prefix cache then
            # holds (all but a last partial block); OpenAI's models require the field.
            "input_tokens_details": {
                "cached_tokens": final.num_cached_tokens,
                "cache_write_tokens": self.prompt_len - final.num_cached_tokens,
            },
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": self.prompt_len + output_tokens,
        }
        if self.body.store:
            self.store.put(self.response_id, response, [*self.conversation, items.assistant_message()])
        return response

    async def events(self, first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        sequence = 0

        def sse(event: Event) -> str:
            nonlocal sequence
            event = {**event, "sequence_number": sequence}
            sequence += 1
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            return f"event: {event['type']}\ndata: {data}\n\n"

        yield sse({"type": "response.created", "response": self.skeleton("in_progress")})
        yield sse({"type": "response.in_progress", "response": self.skeleton("in_progress")})
        items = OutputItems()
        sent = ""
        try:
            output: RequestOutput | None = first
            latest = first
            while output is not None:
                latest = output
                c = output.outputs[0]
                if c.finish_reason == "abort":
                    raise SHUTDOWN_ABORT
                finished = c.finish_reason is not None
                if self.plan.active:
                    delta = self.parser.delta(c.text, finished)
                else:
                    delta, sent = {"content": c.text[len(sent) :]}, c.text
                for event in items.feed(delta):
                    yield sse(event)
                output = await anext(stream, None)
            for event in items.close(self.status(latest.outputs[0].finish_reason)):
                yield sse(event)
            response = self.finish(items, latest)
            kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
            yield sse({"type": kind, "response": response})
        except APIError as exc:
            yield sse({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param})
        except Exception:
            logger.exception("error while streaming %s", self.response_id)
            yield sse({"type": "error", "code": INTERNAL.code, "message": INTERNAL.message, "param": None})


def get_response(store: ResponseStore, response_id: str) -> JSONResponse:
    stored = store.get(response_id)
    if stored is None:
        error = not_found(response_id, store)
        error.param = None
        raise error
    return JSONResponse(stored.response)


def delete_response(store: ResponseStore, response_id: str) -> JSONResponse:
    if not store.delete(response_id):
        error = not_found(response_id, store)
        error.param = None
        raise error
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
