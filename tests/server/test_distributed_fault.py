"""A worker process killed mid-request: the request ends with an OpenAI-shaped 503 within seconds,
/ready and /health turn 503 naming the dead rank, new requests are refused; nothing hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from kvik_server.context import ServerSettings
from server_harness import InProcessServer


def test_a_killed_worker_fails_in_flight_requests_and_readiness(tiny_model: Path) -> None:
    server = InProcessServer(tiny_model, ServerSettings(served_model_name="tiny"), tensor_parallel_size=2)
    try:
        assert server.get("/ready").status_code == 200
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
        pending = asyncio.run_coroutine_threadsafe(server.client.post("/v1/completions", json=body), server.loop)
        engine = server.engine.engine
        deadline = time.monotonic() + 30
        while engine.get_stats().generation_tokens_total < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the request is being decoded
        assert not pending.done()
        os.kill(engine.executor.pids[1], signal.SIGKILL)
        killed = time.monotonic()
        response = pending.result(timeout=10)
        assert time.monotonic() - killed < 5
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable" and "worker rank 1" in error["message"]
        for path in ("/ready", "/health"):
            status = server.get(path)
            assert status.status_code == 503 and "worker rank 1" in status.json()["reason"], status.json()
        again = server.post("/v1/completions", {**body, "max_tokens": 2})
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_unavailable"
    finally:
        server.close()
