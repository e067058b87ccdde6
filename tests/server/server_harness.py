"""Servers for the server tests (imported by conftest and tests): a real `kvik serve` subprocess on
loopback, and the app in-process on a background event loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
API_KEY = "test-key-123"
MAX_MODEL_LEN = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A `python -m kvik_server` child process; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, model: Path, args: list[str], log_path: Path, api_key: str | None = API_KEY) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "kvik_server", "--model", str(model), "--device", "cpu", "--port", str(self.port),
               "--max-model-len", str(MAX_MODEL_LEN), "--num-threads", "1", "--log-level", "warning", *args]  # fmt: skip
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, OMP_NUM_THREADS="1", KVIK_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60.0, **kwargs)

    def openai(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0)

    def async_openai(self) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0)

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: metric name -> value (labels dropped, last sample wins)."""
        text = httpx.get(self.base_url + "/metrics", timeout=10.0).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            values[name_part.split("{", 1)[0]] = float(value)
        return values

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


class InProcessServer:
    """The app on an event loop in a background thread (the engine needs one long-lived loop).

    ``settings`` defaults to serving the model as "tiny"; ``engine_kwargs`` override the small engine
    (max_model_len 256, 8 sequences, one torch thread).
    """

    def __init__(self, model: Path, settings: Any = None, engine: Any = None, **engine_kwargs: Any) -> None:
        from kvik.engine.async_llm import AsyncLLM
        from kvik_server.app import build_app
        from kvik_server.context import ServerSettings

        kwargs: dict[str, Any] = {"max_model_len": 256, "max_num_seqs": 8, "num_threads": 1, **engine_kwargs}
        # ``engine``: an already built AsyncLLM-shaped engine (e.g. a data-parallel router) to serve instead.
        self.engine = engine if engine is not None else AsyncLLM.from_engine_args(model=str(model), device="cpu", **kwargs)
        self.app = build_app(self.engine, settings or ServerSettings(served_model_name="tiny"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.run(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False), base_url="http://kvik"
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def post(self, path: str, body: Any) -> httpx.Response:
        # json.dumps writes NaN/Infinity for non-finite floats, which json.loads on the server accepts
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.run(self.client.post(path, content=content, headers={"content-type": "application/json"}))

    def get(self, path: str) -> httpx.Response:
        return self.run(self.client.get(path))

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
