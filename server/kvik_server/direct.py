"""The app's POST handlers called without the ASGI stack: how ``kvik run-batch`` runs a line.

A batch line must be answered exactly as ``POST url`` with its body is answered by ``kvik serve``.
Sending each line through the whole app (middleware, routing, FastAPI's dependency solving, the body
encoded and parsed again) cost Python that shares the GIL with the engine thread: about 40% of the event
loop's time per line (issue 19, docs/benchmarks.md "runs k1-k3"). Here a line's body goes through the
steps the app would run, by the same code:
the JSON route's document check, the route's request model, the route's handler, and the app's
exception handlers' answers. tests/server/test_run_batch.py compares the results with a server's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from kvik_server.context import ServingContext
from kvik_server.errors import INTERNAL_ERROR_MESSAGE, APIError, error_response, invalid_json, validation_error
from kvik_server.json_body import check_document
from kvik_server.protocol import ChatCompletionRequest, CompletionRequest
from kvik_server.protocol_pooling import ClassifyRequest, EmbeddingRequest, RerankRequest, ScoreRequest
from kvik_server.serving_chat import create_chat_completion
from kvik_server.serving_completion import create_completion
from kvik_server.serving_pooling import create_classify, create_embeddings, create_rerank, create_score

logger = logging.getLogger(__name__)

Handler = Callable[[ServingContext, Any], Awaitable[Response]]


# The routes build_app registers for these paths, with the same request models and handlers. A caller
# with no client passes no request to race a disconnect against (None).
ROUTES: dict[str, tuple[type[BaseModel], Handler]] = {
    "/v1/chat/completions": (ChatCompletionRequest, lambda ctx, body: create_chat_completion(ctx, body, None)),
    "/v1/completions": (CompletionRequest, lambda ctx, body: create_completion(ctx, body, None)),
    "/v1/embeddings": (EmbeddingRequest, create_embeddings),
    **dict.fromkeys(("/v1/rerank", "/rerank", "/v2/rerank"), (RerankRequest, create_rerank)),
    **dict.fromkeys(("/score", "/v1/score"), (ScoreRequest, create_score)),
    **dict.fromkeys(("/classify", "/v1/classify"), (ClassifyRequest, create_classify)),
}


async def post(app: FastAPI, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """``POST path`` with the JSON object ``body`` to ``app`` (built by build_app, its lifespan running):
    (status, the decoded response body). ``path`` is one of :data:`ROUTES`."""
    ctx: ServingContext = app.state.ctx
    model, handler = ROUTES[path]
    try:
        try:
            check_document(body)  # JSONRoute's check: nesting depth, lone surrogates
        except json.JSONDecodeError as exc:
            raise invalid_json(exc.msg) from None
        try:
            request = model.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        response = await handler(ctx, request)
    except APIError as exc:
        response = exc.response()
    except Exception:
        logger.exception("unhandled error while serving POST %s", path)
        response = error_response(500, INTERNAL_ERROR_MESSAGE)
    return response.status_code, json.loads(bytes(response.body))
