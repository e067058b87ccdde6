"""One JSON body parser for every route, so a malformed body is always a 400 naming the problem.

``json.loads`` raises more than ``JSONDecodeError``: ``RecursionError`` for a deeply nested document,
``ValueError`` for an integer longer than ``sys.get_int_max_str_digits()`` (4,300 digits) and
``UnicodeDecodeError`` for bytes that are not UTF-8/16/32. :func:`loads` turns all of them into a
``JSONDecodeError`` with a readable message, and also refuses documents nested deeper than
:data:`MAX_DEPTH`: such a document parses, but recursive code further on (validation messages,
chat-template data conversion, ``json.dumps``) would hit the interpreter's recursion limit.

Routes whose body FastAPI parses get it through :class:`JSONRoute` (FastAPI answers a
``JSONDecodeError`` with a ``json_invalid`` validation error, which ``errors.validation_error``
words for the client); routes that read the body themselves call :func:`loads` directly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

# No OpenAI request nests anywhere near this deep; JSON schemas in response_format / guided_json /
# tools nest a few levels per object property.
MAX_DEPTH = 100


def loads(body: bytes | str) -> Any:
    """Parse a request body; every failure is a ``json.JSONDecodeError`` whose ``msg`` says what is wrong."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 ({exc.reason} at byte {exc.start})", "", 0) from None
    except RecursionError:
        raise json.JSONDecodeError(f"the document is nested more than {MAX_DEPTH} levels deep", "", 0) from None
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()  # Python >= 3.10.7
        raise json.JSONDecodeError(f"an integer in the document has more than {digits} digits", "", 0) from None
    if depth_exceeds(data, MAX_DEPTH):
        raise json.JSONDecodeError(f"the document is nested more than {MAX_DEPTH} levels deep", "", 0)
    return data


def depth_exceeds(data: Any, limit: int) -> bool:
    """True if ``data`` nests lists/dicts more than ``limit`` levels (iterative: no recursion of our own)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class JSONRequest(Request):
    """A Request whose ``json()`` is :func:`loads`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """FastAPI route class that parses bodies with :func:`loads` (set as ``app.router.route_class``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(JSONRequest(request.scope, request.receive))

        return route
