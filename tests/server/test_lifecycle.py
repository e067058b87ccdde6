"""Client disconnects free KV blocks, back-pressure answers 503, SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from server_harness import ServerProcess

LONG = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 4000,
        "ignore_eos": True, "temperature": 0.0}  # fmt: skip
# The tiny model decodes at 1.5-18 ms per step on 2 shared cores: LONG runs for 6 s at the very least.


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def idle(server: ServerProcess) -> bool:
    m = server.metrics()
    return (m["kvik:num_requests_running"], m["kvik:num_requests_waiting"], m["kvik:kv_cache_usage_perc"]) == (0, 0, 0)


def test_stream_disconnect_aborts_and_frees_kv(server: ServerProcess) -> None:
    wait_for(lambda: idle(server), 30, "an idle server")
    before = server.metrics()["kvik:generation_tokens_total"]
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):  # role chunk + a few content chunks: the request is decoding
            next(lines)
        assert server.metrics()["kvik:kv_cache_usage_perc"] > 0
    wait_for(lambda: idle(server), 2.0, "running == 0 and KV usage == 0 after the disconnect")
    time.sleep(0.3)
    generated = server.metrics()["kvik:generation_tokens_total"] - before
    assert generated < 300, f"the request kept decoding after the disconnect ({generated} tokens)"


def test_non_stream_disconnect_aborts(server: ServerProcess) -> None:
    wait_for(lambda: idle(server), 30, "an idle server")
    with server.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=LONG, timeout=httpx.Timeout(60.0, read=1.0))
    wait_for(lambda: idle(server), 2.0, "running == 0 and KV usage == 0 after the disconnect")


@pytest.fixture(scope="module")
def small_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """Two running sequences, one waiting, and a 2.5 s shutdown grace period."""
    return start_server("--max-num-seqs", "2", "--max-waiting-requests", "1", "--shutdown-grace-period", "2.5",
                        api_key=None)  # fmt: skip


async def _stream(client: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event) -> list[str]:
    """All SSE events of one streamed chat; ``started`` is set at the first event."""
    events = []
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line:
                events.append(line)
                started.set()
    return events


async def _wait_metric(server: ServerProcess, name: str, value: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()[name] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.05)


def test_back_pressure_503(small_server: ServerProcess) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=60.0) as client:
            events = [asyncio.Event() for _ in range(3)]
            tasks = [asyncio.create_task(_stream(client, LONG, e)) for e in events]  # 2 run, 1 waits
            await _wait_metric(small_server, "kvik:num_requests_running", 2)
            await _wait_metric(small_server, "kvik:num_requests_waiting", 1)
            r = await client.post("/v1/chat/completions", json={**LONG, "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_overloaded"
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        wait_for(lambda: idle(small_server), 5.0, "the server to drop all requests")
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=60.0) as client:
            r = await client.post("/v1/chat/completions", json={**LONG, "max_tokens": 2})
            assert r.status_code == 200, r.text

    asyncio.run(scenario())


def test_sigterm_drains_then_exits_0(small_server: ServerProcess) -> None:
    """SIGTERM: a short request finishes within the 2.5 s grace period, a long one is aborted when
    it runs out, new work gets 503 while draining, and the process exits 0."""
    grace = 2.5
    url = small_server.base_url

    async def scenario() -> tuple[list[str], list[str], float]:
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
            short_started, long_started = asyncio.Event(), asyncio.Event()
            # 50 tokens: <= 0.9 s even at 18 ms/step; LONG: >= 6 s even at 1.5 ms/step
            short = asyncio.create_task(_stream(client, {**LONG, "max_tokens": 50}, short_started))
            long = asyncio.create_task(_stream(client, LONG, long_started))
            await asyncio.wait_for(asyncio.gather(short_started.wait(), long_started.wait()), 30)
            small_server.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            await asyncio.sleep(0.2)
            async with httpx.AsyncClient(base_url=url, timeout=10.0) as other:  # a fresh connection
                assert (await other.get("/ready")).status_code == 503
                refused = await other.post("/v1/chat/completions", json={**LONG, "max_tokens": 2})
                assert refused.status_code == 503 and "retry-after" in refused.headers
            short_events, long_events = await asyncio.gather(short, long)
            return short_events, long_events, start

    short_events, long_events, start = asyncio.run(scenario())
    assert short_events[-1] == "data: [DONE]"
    assert json.loads(short_events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    assert long_events[-1] == "data: [DONE]", long_events[-3:]
    error = json.loads(long_events[-2][len("data: ") :]).get("error")
    assert error is not None and "shutting down" in error["message"], long_events[-3:]
    assert small_server.proc.wait(30) == 0
    assert time.monotonic() - start < grace + 10
