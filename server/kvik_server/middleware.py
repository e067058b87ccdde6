"""Pure-ASGI guard in front of the app: bearer auth, request-body size limit, HTTP counters.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming responses and client disconnects pass
through untouched.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvik_server.errors import error_response

# Routes that need the API key when one is set. /health, /ready, /version and /metrics stay
# open so orchestrators and Prometheus need no secret (as in vLLM, which guards only /v1).
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def is_protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Sequence[str] = (),
        max_body_bytes: int | None = None,
        on_response: Callable[[str, int], None] | None = None,
        known_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        # Compare digests in constant time so response timing leaks nothing about the key.
        self._key_digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.max_body_bytes = max_body_bytes
        self.on_response = on_response
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        send = self._counting(path, send)
        if self._key_digests and scope["method"] != "OPTIONS" and is_protected(path):
            problem = self._auth_problem(scope)
            if problem is not None:
                response = error_response(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        if self.max_body_bytes is not None and scope["method"] in _BODY_METHODS:
            replay = await self._read_limited(scope, receive, send)
            if replay is None:
                return
            receive = replay
        await self.app(scope, receive, send)

    def _counting(self, path: str, send: Send) -> Send:
        if self.on_response is None:
            return send
        label = path if path in self.known_paths else "other"
        on_response = self.on_response

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                on_response(label, int(message["status"]))
            await send(message)

        return wrapped

    def _auth_problem(self, scope: Scope) -> str | None:
        header = _header(scope, b"authorization")
        if header is None:
            return "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Malformed Authorization header; expected 'Authorization: Bearer YOUR_KEY'."
        digest = hashlib.sha256(token.strip().encode()).digest()
        if not any(secrets.compare_digest(digest, k) for k in self._key_digests):
            return "Incorrect API key provided."
        return None

    async def _read_limited(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body (≤ limit) and return a receive that replays it; None if we answered."""
        limit = self.max_body_bytes
        assert limit is not None
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await error_response(400, f"Invalid Content-Length header {declared!r}.")(scope, receive, send)
                return None
            if int(declared) > limit:
                await self._too_large(int(declared), scope, receive, send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > limit:  # chunked uploads have no Content-Length: count as we read
                await self._too_large(size, scope, receive, send, at_least=True)
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()  # after the body: http.disconnect when the client goes away

        return replay

    async def _too_large(self, size: int, scope: Scope, receive: Receive, send: Send, at_least: bool = False) -> None:
        seen = f"at least {size}" if at_least else str(size)
        response = error_response(
            413,
            f"The request body is too large: {seen} bytes, the limit is {self.max_body_bytes} bytes "
            "(server flag --max-request-body-bytes).",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
