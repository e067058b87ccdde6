"""What the OpenAPI document (``/openapi.json``) says beyond what FastAPI infers from the routes.

FastAPI documents a 422 ``HTTPValidationError`` on every route with a body or parameters; kvik answers
invalid requests with a 400 OpenAI-shaped error instead (errors.py), so the document says that.
/tokenize parses its own body (two forms), so its request schema is given here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kvik_server.protocol import TokenizeChatRequest, TokenizeCompletionRequest

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def tokenize_request_body() -> dict[str, Any]:
    """``openapi_extra`` for /tokenize: a prompt form or a messages form."""
    ref = "#/components/schemas/{model}"  # ChatMessage and ContentPart are there (the chat route uses them)
    forms = [model.model_json_schema(ref_template=ref) for model in (TokenizeCompletionRequest, TokenizeChatRequest)]
    for form in forms:
        form.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": forms}}}}}


def install_openapi(app: FastAPI) -> None:
    """Replace FastAPI's 422 responses with the 400 error body kvik sends."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in doc.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None or "requestBody" in operation:
                        responses.setdefault("400", {
                            "description": "Invalid request (OpenAI-shaped error).",
                            "content": {"application/json": {"schema": _ERROR_REF}},
                        })  # fmt: skip
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
