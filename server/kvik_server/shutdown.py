"""uvicorn server whose first SIGTERM/SIGINT drains instead of closing the listener at once.

On the first signal: the app stops admitting work (new generation requests get 503 +
Retry-After, /ready turns 503) while the listener stays open, in-flight requests get
``grace_period`` seconds to finish, the rest are aborted, then uvicorn shuts down and
the process exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from kvik_server.context import ServingContext

logger = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServingContext, grace_period: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.grace_period = grace_period
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._drain_requested = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's handler this does not record the signal for re-raising after
        # shutdown: a drained server exits 0.
        if self._loop is None or not self.started:  # still starting up: just stop
            self.should_exit = True
            return
        if self._drain_requested:  # a second signal
            if sig == signal.SIGINT:
                self.force_exit = self.should_exit = True
            return
        self._drain_requested = True
        logger.info("received signal %d: draining for up to %.1fs", sig, self.grace_period)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.ctx.drain(self.grace_period)
        except Exception:
            logger.exception("error while draining; shutting down anyway")
        finally:
            self.should_exit = True
