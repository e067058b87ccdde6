"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

``type`` follows OpenAI's categories (``invalid_request_error``, ``authentication_error``,
``not_found_error``, ``server_error``, ...) and ``code`` is OpenAI's string code where one
exists (``model_not_found``, ``context_length_exceeded``, ``unsupported_parameter`` ...),
else null. Handlers here replace FastAPI's 422 validation answer and its ``{"detail": ...}``
HTTPException body, and turn any unexpected exception into a generic 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to send to the client as-is (status, message, offending parameter)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status_code, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def log(self) -> None:
        """Every client error is logged once, at info, with its reason (uvicorn's access line has the path)."""
        if 400 <= self.status_code < 500:
            logger.info("answered %d (%s): %s", self.status_code, self.code or self.type, self.message)

    def response(self) -> JSONResponse:
        self.log()
        return ErrorResponse(self.body(), status_code=self.status_code, headers=self.headers)


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote request text holding a lone surrogate
    (``"\\ud800"`` is valid JSON), which cannot be encoded as UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status_code: int, message: str, **kwargs: Any) -> JSONResponse:
    return APIError(status_code, message, **kwargs).response()


def sse_error(error: APIError) -> str:
    """An error event for a stream whose 200 status line is already sent."""
    error.log()
    return f"data: {json.dumps(error.body())}\n\n"


def not_enabled(exc: Any) -> APIError:
    """501 for a feature this server's installation lacks; the install hint goes to the operator's log."""
    logger.warning("a request needed a feature that is not installed: %s", exc.operator_hint)
    return APIError(501, exc.client_message[:1].upper() + exc.client_message[1:] + ".", code="feature_not_enabled")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def invalid_json(reason: str) -> APIError:
    """The 400 for a body that is not JSON (``reason`` from ``json_body.loads``), the same on every route."""
    return bad_request(f"We could not parse the JSON body of your request. The body must be a JSON object ({reason}).")


# OpenAI fields kvik does not implement: named in the 400 instead of "unknown field".
UNSUPPORTED_FIELDS = frozenset(
    {
        "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
        "audio", "modalities", "prediction", "reasoning_effort", "web_search_options", "suffix", "service_tier", "store", "metadata", "verbosity",
        "prompt_cache_key", "safety_identifier", "tool_calls", "refusal", "annotations",
    }
)  # fmt: skip


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic tags union members in the location (e.g. "list[int]"); they mean nothing to a client
    parts = [p for p in parts if not any(c in p for c in "[]()") and p not in {"str", "int", "function-after"}]
    return ".".join(parts) or None


def validation_error(errors: Sequence[Any]) -> APIError:
    """Turn pydantic/FastAPI validation errors into one 400 naming the first bad field."""
    if not errors:
        return bad_request("The request body is invalid.")
    err = errors[0]
    # A union (e.g. the four prompt shapes) reports one error per member; the most telling
    # is one that is not "wrong type" (like "too long").
    first_param = _loc_to_param(tuple(err.get("loc", ())))
    for candidate in errors:
        same = _loc_to_param(tuple(candidate.get("loc", ()))) == first_param
        if same and not str(candidate.get("type", "")).endswith("_type"):
            err = candidate
            break
    loc = tuple(err.get("loc", ()))
    param = _loc_to_param(loc)
    kind = err.get("type", "")
    name = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        if name in UNSUPPORTED_FIELDS:
            return bad_request(
                f"Unsupported parameter: '{param}' is not supported by kvik; remove it from the request.",
                param=param,
                code="unsupported_parameter",
            )
        shown = param if param is not None else json.dumps(name)
        return bad_request(f"Unrecognized request argument supplied: {shown}", param=param, code="unknown_parameter")
    if kind == "json_invalid":
        return invalid_json(str(err.get("ctx", {}).get("error", "invalid JSON")))
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "model_attributes_type" or (param is None and kind.endswith("_type")):
        return bad_request("The request body must be a JSON object.")
    if param is not None and param.split(".")[0] == "prompt" and kind.endswith("_type"):
        return bad_request(
            "'prompt' must be a string, a list of strings, a list of token ids (integers) or a list of "
            f"token-id lists (got {_short(err.get('input'))}).",
            param="prompt",
            code="invalid_value",
        )
    message = str(err.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    shown = _short(err.get("input"))
    return bad_request(f"Invalid value for '{param}': {message} (got {shown}).", param=param, code="invalid_value")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"
_PHRASES = {404: "Not found: {path}.", 405: "Method {method} is not allowed on {path}."}


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app can produce OpenAI-shaped."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        template = _PHRASES.get(exc.status_code)
        if template is not None:
            message = template.format(path=request.url.path, method=request.method)
        else:
            message = str(exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Log the traceback for the operator; the client only learns that it was our fault.
        logger.exception("unhandled error while serving %s %s", request.method, request.url.path)
        return error_response(500, INTERNAL_ERROR_MESSAGE)
