"""``build_app(engine, args)``: the FastAPI app around an AsyncLLM.

Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/responses (+ GET/DELETE by id),
/v1/embeddings, /v1/rerank, /score, /classify (pooling models),
/tokenize, /detokenize, /health (liveness), /ready (readiness), /version, /metrics (Prometheus), and the
chat page at / (ui/, unless ``--no-ui``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError

import kvik_server
from kvik_server.chat_output import ParserSettings
from kvik_server.context import ServerSettings, ServingContext
from kvik_server.errors import APIError, bad_request, install_error_handlers, invalid_json, validation_error
from kvik_server.json_body import JSONRoute, loads
from kvik_server.metrics import CONTENT_TYPE
from kvik_server.middleware import GuardMiddleware
from kvik_server.openapi import install_openapi, tokenize_request_body
from kvik_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorBody,
    HealthProblem,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    UnloadLoRAAdapterRequest,
)
from kvik_server.protocol_pooling import ClassifyRequest, EmbeddingRequest, RerankRequest, ScoreRequest
from kvik_server.protocol_responses import ResponsesRequest
from kvik_server.response_store import ResponseStore
from kvik_server.serving_chat import create_chat_completion, template_message
from kvik_server.serving_completion import create_completion
from kvik_server.serving_pooling import create_classify, create_embeddings, create_rerank, create_score
from kvik_server.serving_responses import create_response, delete_response, get_response
from kvik_server.ui import install_ui


def build_app(engine: Any, args: Any = None) -> FastAPI:
    """The app serving ``engine`` (an AsyncLLM); ``args`` is the ``kvik serve`` namespace or ServerSettings.

    The engine's step loop starts with the app's lifespan and stops when it ends.
    """
    settings = args if isinstance(args, ServerSettings) else ServerSettings.from_args(args)
    ParserSettings.of(settings).validate()
    ctx = ServingContext(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.start()
        try:
            yield
        finally:
            await ctx.shutdown_engine(0.0)

    app = FastAPI(title="kvik", version=kvik_server.__version__, lifespan=lifespan)
    app.router.route_class = JSONRoute  # every route parses JSON bodies the same way (json_body.py)
    app.state.ctx = ctx
    app.state.response_store = store = ResponseStore()
    install_error_handlers(app)

    def model_card(model: str | None = None) -> ModelCard:
        lora = ctx.check_model(model)
        if lora is not None:  # an adapter: its parent is the base model (vLLM's shape)
            return ModelCard(id=lora.lora_name, root=lora.lora_path, parent=ctx.model_name,
                             max_model_len=ctx.max_model_len)  # fmt: skip
        return ModelCard(id=ctx.model_name, root=_public_root(engine.model_name), max_model_len=ctx.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card(), *(model_card(name) for name in ctx.loras.adapters)])

    # OpenAI's "retrieve model"; :path because ids may hold slashes (org/name)
    @app.get("/v1/models/{model_id:path}", responses={404: {"model": ErrorBody, "description": "Unknown model."}})
    async def retrieve_model(model_id: str) -> ModelCard:
        return model_card(model_id)

    # LoRA adapters at run time (docs/lora.md): only with --allow-runtime-lora-updating, behind the API key.
    lora_errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "Bad adapter (path, config, rank) or name."},
        404: {"model": ErrorBody, "description": "Unknown adapter, or run-time updating is off."},
        409: {"model": ErrorBody, "description": "The adapter has requests in flight."},
    }

    def check_updates_allowed() -> None:
        if not ctx.loras.allow_updates:
            raise APIError(404, "Loading and unloading LoRA adapters at run time is off on this server; start it "
                           "with --allow-runtime-lora-updating", code="lora_updates_disabled")  # fmt: skip

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=lora_errors)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        check_updates_allowed()
        await ctx.loras.load(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=lora_errors)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        check_updates_allowed()
        await ctx.loras.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(ctx, body, raw)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(ctx, body, raw)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw: Request) -> Response:
        return await create_response(ctx, store, body, raw)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> JSONResponse:
        return get_response(store, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def remove_response(response_id: str) -> JSONResponse:
        return delete_response(store, response_id)

    # Pooling models (kvik.pooling, serving_pooling.py); vLLM's paths, with and without /v1.
    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        return await create_embeddings(ctx, body)

    @app.post("/v1/rerank")
    @app.post("/rerank", include_in_schema=False)
    @app.post("/v2/rerank", include_in_schema=False)
    async def rerank(body: RerankRequest) -> JSONResponse:
        return await create_rerank(ctx, body)

    @app.post("/score")
    @app.post("/v1/score", include_in_schema=False)
    async def score(body: ScoreRequest) -> JSONResponse:
        return await create_score(ctx, body)

    @app.post("/classify")
    @app.post("/v1/classify", include_in_schema=False)
    async def classify(body: ClassifyRequest) -> JSONResponse:
        return await create_classify(ctx, body)

    @app.post("/tokenize", openapi_extra=tokenize_request_body())
    async def tokenize(raw: Request) -> JSONResponse:
        data = await _json_object(raw)
        try:
            if "messages" in data:
                chat = TokenizeChatRequest.model_validate(data)
                ctx.check_model(chat.model)
                tokens = await ctx.render_chat(
                    [template_message(m) for m in chat.messages],
                    add_special_tokens=chat.add_special_tokens,
                    add_generation_prompt=chat.add_generation_prompt,
                    continue_final_message=chat.continue_final_message,
                    **(chat.chat_template_kwargs or {}),
                )
            else:
                plain = TokenizeCompletionRequest.model_validate(data)
                ctx.check_model(plain.model)
                tokens = await ctx.encode(plain.prompt, add_special_tokens=plain.add_special_tokens)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        return JSONResponse(
            {"count": len(tokens), "max_model_len": ctx.max_model_len, "tokens": tokens, "token_strs": None}
        )

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        ctx.check_model(body.model)
        ctx.check_token_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": await ctx.decode(body.tokens)})

    @app.get("/health", response_class=Response, responses={
        200: {"description": "The engine loop is alive (empty body)."},
        503: {"description": "The engine loop is not running.", "model": HealthProblem},
    })  # fmt: skip
    async def health() -> Response:
        if ctx.started and engine.is_healthy():
            return Response(status_code=200)
        error = getattr(engine, "error", None)  # what stopped the loop (a worker process that died, ...)
        reason = "the engine loop is not running" + (f": {error}" if error is not None else "")
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok, reason = readiness(ctx)
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "reason": reason}, status_code=200 if ok else 503
        )

    @app.get("/version")
    async def version() -> dict[str, str]:
        from kvik.version import __version__ as core_version

        return {"version": kvik_server.__version__, "kvik_core": core_version}

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format 0.0.4.",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
    })  # fmt: skip
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    if settings.ui:
        install_ui(app)
    install_openapi(app)
    known = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.add_middleware(
        GuardMiddleware,
        api_keys=settings.api_keys,
        max_body_bytes=settings.max_request_body_bytes,
        on_response=ctx.metrics.observe_http,
        known_paths=known,
    )
    return app


def readiness(ctx: ServingContext) -> tuple[bool, str]:
    """Ready = engine loaded and running, not draining, and not wedged.

    Wedged means work is queued yet the engine has not completed a step for
    ``ready_stall_seconds`` (measured from the later of the last step and the moment the
    oldest in-flight request arrived, so a long idle spell followed by a request is fine).
    An idle engine is ready.
    """
    if ctx.draining:
        return False, "the server is shutting down"
    if not ctx.started:
        return False, "the engine has not started"
    if not ctx.engine.is_healthy():
        error = getattr(ctx.engine, "error", None)  # e.g. a worker process died (kvik.executor)
        return False, "the engine loop is not running" + (f": {error}" if error is not None else "")
    stats = ctx.engine.get_stats()
    busy_since = ctx.busy_since()
    # The server's own count of requests awaiting the engine counts too: a wedged step
    # also freezes the engine's statistics.
    if busy_since is None and stats.num_running + stats.num_waiting == 0:
        return True, "idle"
    if busy_since is None:
        busy_since = stats.last_step_time
    stalled = time.monotonic() - max(stats.last_step_time, busy_since)
    if stalled > ctx.settings.ready_stall_seconds:
        return False, (
            f"the engine made no progress for {stalled:.0f}s while {len(ctx.engine_pending)} requests await it "
            f"(last reported: {stats.num_running} running, {stats.num_waiting} waiting)"
        )
    return True, "serving"


async def _json_object(raw: Request) -> dict[str, Any]:
    try:
        data = loads(await raw.body())
    except json.JSONDecodeError as exc:
        raise invalid_json(exc.msg) from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    return data


def _public_root(model: object) -> str:
    """The model's file or directory name: ``root`` must not tell clients the server's filesystem layout."""
    return os.path.basename(str(model).rstrip("/\\")) or str(model)
