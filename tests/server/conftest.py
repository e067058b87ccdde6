"""Fixtures for the server tests: a tiny random model and real `kvik serve` subprocesses on loopback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_HERE = os.path.dirname(__file__)
if _HERE not in sys.path:  # --import-mode=importlib: make server_harness importable from the tests
    sys.path.insert(0, _HERE)

from server_harness import API_KEY, ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama", max_position_embeddings=4096)


@pytest.fixture(scope="session")
def start_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server(*extra_flags, api_key=API_KEY) -> a healthy ServerProcess (stopped at session end)."""
    started: list[ServerProcess] = []
    logs = tmp_path_factory.mktemp("server_logs")

    def start(*args: str, api_key: str | None = API_KEY, wait: bool = True) -> ServerProcess:
        server = ServerProcess(tiny_model, list(args), logs / f"server{len(started)}.log", api_key=api_key)
        started.append(server)
        if wait:
            server.wait_healthy()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """The shared server most tests talk to (API key required; 16 sequences per batch; 64 KiB bodies)."""
    return start_server("--max-num-seqs", "16", "--served-model-name", "tiny", "--max-request-body-bytes", "64KiB")


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`kvik serve` on the bundled SmolLM2 GGUF with tool calling and reasoning parsers on (no API key)."""
    from kvik.models.default import default_model

    try:
        model = default_model()
    except (ImportError, ValueError) as exc:
        pytest.skip(f"the bundled SmolLM2 GGUF is not installed: {exc}")
    flags = ["--served-model-name", "smollm2", "--max-num-seqs", "8", "--enable-auto-tool-choice",
             "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]  # fmt: skip
    server = ServerProcess(Path(model), flags, tmp_path_factory.mktemp("smollm2") / "server.log", api_key=None)
    try:
        server.wait_healthy(timeout=180.0)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def smollm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`kvik serve` with the bundled SmolLM2 model, served as "smollm2" (API key required); skipped when the
    model is not installed. Shared by the chat page and run-batch tests: one model load."""
    try:
        from kvik.models.default import default_model

        model = Path(default_model())
    except (ImportError, ValueError) as exc:
        pytest.skip(f"the bundled SmolLM2 model is not installed: {exc}")
    logs = tmp_path_factory.mktemp("smollm_server")
    server = ServerProcess(model, ["--served-model-name", "smollm2"], logs / "server.log", api_key=API_KEY)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()
