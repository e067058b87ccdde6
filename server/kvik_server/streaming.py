"""Helpers for streamed (SSE) and collected responses that never leak an engine request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before we could answer."""


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that runs ``on_close`` however it ends.

    Starlette cancels the body iterator when the client disconnects, and never starts it if
    the client left before the first byte; either way ``on_close`` (abort the engine request)
    runs, shielded from the cancellation.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self._on_close is not None:
                    await self._on_close()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request | None, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` but cancel it (raising ClientDisconnected) if the client disconnects.

    Non-streamed requests need this: nothing else tells a handler its client is gone, and a
    long generation would hold its KV blocks until the end. ``request`` None: a caller with no
    client (``kvik run-batch``'s lines, kvik_server/direct.py), nothing to race.
    """
    if request is None:
        return await awaitable
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.gather(work, return_exceptions=True)
    raise ClientDisconnected()


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several async iterators as items arrive, tagged with the stream's index.

    Closing the merged iterator cancels every still-running source (whose own cleanup then
    aborts its engine request). An exception in any source propagates.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            aclose = getattr(streams[0], "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None, False))
            await queue.put((index, None, None, True))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # forwarded to the consumer
            await queue.put((index, None, exc, True))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
            for stream in streams:  # a source whose task never started still holds its seats
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()


async def collect(stream: AsyncIterator[T]) -> T | None:
    """The last item of a stream of cumulative outputs."""
    last = None
    async for item in stream:
        last = item
    return last
