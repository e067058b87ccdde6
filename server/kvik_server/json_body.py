"""One JSON body parser for every route, so a malformed body is always a 400 naming the problem.

``json.loads`` raises more than ``JSONDecodeError``: ``RecursionError`` for a deeply nested document,
``ValueError`` for an integer longer than ``sys.get_int_max_str_digits()`` (4,300 digits) and
``UnicodeDecodeError`` for bytes that are not UTF-8/16/32. :func:`loads` turns all of them into a
``JSONDecodeError`` with a readable message, and checks two things JSON allows but the server cannot use:

- nesting deeper than :data:`MAX_DEPTH`: such a document parses, but recursive code further on
  (validation messages, chat-template data conversion, ``json.dumps``) would hit the recursion limit;
- a lone UTF-16 surrogate (``"\\ud800"`` is a valid JSON escape, but not Unicode text): tokenizers,
  grammar compilers and UTF-8 encoders all fail on one. A 400 names where it is.

Routes whose body FastAPI parses get it through :class:`JSONRoute`; routes that read the body themselves
call :func:`loads` directly.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from kvik_server.errors import APIError, bad_request, invalid_json

# No OpenAI request nests anywhere near this deep; JSON schemas in response_format / guided_json /
# tools nest a few levels per object property.
MAX_DEPTH = 100
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins an escaped *pair* into one character


def loads(body: bytes | str) -> Any:
    """Parse a request body: ``json.JSONDecodeError`` (its ``msg`` says what is wrong) if it is not
    JSON, :class:`APIError` (400) for a lone surrogate."""
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
    check_document(data)
    return data


def check_document(data: Any) -> None:
    """Walk the document once (iteratively: no recursion of our own) for depth and lone surrogates."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            check_text(value, _param(path))
            continue
        if isinstance(value, dict):
            for key in value:
                check_text(key, _param((*path, key)) + " (a key)")
            children: Any = value.items()
        elif isinstance(value, list):
            children = enumerate(value)
        else:
            continue
        if depth > MAX_DEPTH:
            raise json.JSONDecodeError(f"the document is nested more than {MAX_DEPTH} levels deep", "", 0)
        stack.extend(
            (child, depth + 1, (*path, key)) for key, child in children if isinstance(child, (str, dict, list))
        )


def check_text(text: str, param: str) -> None:
    """400 for a lone UTF-16 surrogate in ``text`` (``param`` names where it came from)."""
    match = _SURROGATE.search(text)
    if match is not None:
        raise surrogate_error(param, ord(match.group()), match.start())


def surrogate_error(param: str, code_point: int, position: int) -> APIError:
    return bad_request(
        f"'{param}' contains a lone UTF-16 surrogate (U+{code_point:04X} at character {position}), which is not "
        "valid Unicode text. Send valid UTF-8; a character outside the Basic Multilingual Plane is escaped in "
        'JSON as a surrogate pair such as "\\ud83d\\ude00".',
        param=param.split(" ", 1)[0] or None,
        code="invalid_value",
    )


def _param(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


class JSONRequest(Request):
    """A Request whose ``json()`` is :func:`loads`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """FastAPI route class that parses bodies with :func:`loads` (set as ``app.router.route_class``).

    The body is parsed before FastAPI's handler runs, so its problems become our 400s: FastAPI would
    answer any exception but ``JSONDecodeError`` with a generic "There was an error parsing the body".
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route(request: Request) -> Response:
            request = JSONRequest(request.scope, request.receive)
            if takes_body and await request.body():
                try:
                    await request.json()  # cached for FastAPI's own call
                except json.JSONDecodeError as exc:
                    return invalid_json(exc.msg).response()
                except APIError as exc:
                    return exc.response()
            return await handler(request)

        return route
