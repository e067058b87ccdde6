"""LoRA adapters through the server: /v1/models, `model` selecting an adapter, run-time load/unload
behind the API key, the error cases, and concurrent requests to different adapters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvik_server.context import ServerSettings
from server_harness import InProcessServer

KEY = "lora-key"
PARTIAL = ("q_proj", "v_proj", "down_proj")
AUTH = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from kvik.testing.tiny_lora import write_random_adapter
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(tiny_model)
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": str(write_random_adapter(root / "alpha", hf, rank=4, std=0.3, seed=1, dtype="float32")),
        "beta": str(
            write_random_adapter(root / "beta", hf, rank=8, std=0.3, seed=2, dtype="float32", targets=PARTIAL)
        ),
        "big": str(write_random_adapter(root / "big", hf, rank=32, seed=3, dtype="float32")),
    }


@pytest.fixture(scope="module")
def lora_server(tiny_model: Path, adapters: dict[str, str]) -> Iterator[InProcessServer]:
    settings = ServerSettings(served_model_name="tiny", api_keys=(KEY,), lora_modules=(f"alpha={adapters['alpha']}",),
                              allow_runtime_lora_updating=True)  # fmt: skip
    server = InProcessServer(tiny_model, settings, enable_lora=True, max_loras=2, max_lora_rank=8)
    yield server
    server.close()


def _post(server: InProcessServer, path: str, body: dict[str, Any], auth: bool = True) -> httpx.Response:
    headers = AUTH if auth else {"content-type": "application/json"}
    return server.run(server.client.post(path, json=body, headers=headers))


def _complete(server: InProcessServer, model: str, prompt: str = "Once upon a time") -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    return _post(server, "/v1/completions", body)


def test_models_lists_adapters_with_parent_and_model_selects_them(lora_server: InProcessServer) -> None:
    models = lora_server.run(lora_server.client.get("/v1/models", headers=AUTH)).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("alpha", "tiny")]
    card = lora_server.run(lora_server.client.get("/v1/models/alpha", headers=AUTH)).json()
    assert card["parent"] == "tiny" and card["root"].endswith("alpha")
    base, alpha = _complete(lora_server, "tiny"), _complete(lora_server, "alpha")
    assert base.status_code == alpha.status_code == 200
    assert alpha.json()["model"] == "alpha"
    assert alpha.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
    missing = _complete(lora_server, "gamma")
    assert missing.status_code == 404 and "`alpha`" in missing.json()["error"]["message"]


def test_load_unload_at_run_time_and_the_errors(lora_server: InProcessServer, adapters: dict[str, str]) -> None:
    load = {"lora_name": "beta", "lora_path": adapters["beta"]}
    assert _post(lora_server, "/v1/load_lora_adapter", load, auth=False).status_code == 401  # behind the API key
    assert _post(lora_server, "/v1/load_lora_adapter", load).status_code == 200
    assert _complete(lora_server, "beta").status_code == 200
    cases = [
        ({"lora_name": "beta", "lora_path": adapters["beta"]}, 400, "already in use"),
        ({"lora_name": "tiny", "lora_path": adapters["beta"]}, 400, "already in use"),
        ({"lora_name": "x", "lora_path": "/no/such/dir"}, 400, "no such directory"),
        ({"lora_name": "x", "lora_path": str(Path(adapters["beta"]).parent)}, 400, "adapter_config.json is missing"),
        ({"lora_name": "x", "lora_path": adapters["big"]}, 400, "rank 32 exceeds max_lora_rank=8"),
        ({"lora_name": "x"}, 400, "lora_path"),
    ]
    for body, status, text in cases:
        response = _post(lora_server, "/v1/load_lora_adapter", body)
        assert response.status_code == status, body
        assert text in response.json()["error"]["message"] and response.json()["error"]["type"]
    assert _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "nope"}).status_code == 404
    assert _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "beta"}).status_code == 200
    assert _complete(lora_server, "beta").status_code == 404
    assert _complete(lora_server, "tiny").status_code == 200  # everyone else is still served


def test_unloading_an_adapter_in_use_is_refused(lora_server: InProcessServer, adapters: dict[str, str]) -> None:
    assert _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": adapters["beta"]}).status_code == 200
    ctx = lora_server.app.state.ctx
    body = {"model": "busy", "prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}

    async def long_request() -> httpx.Response:
        return await lora_server.client.post("/v1/completions", json=body, headers=AUTH)

    future = asyncio.run_coroutine_threadsafe(long_request(), lora_server.loop)
    while not ctx.loras.in_flight["busy"] and not future.done():
        time.sleep(0.005)
    refused = _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "busy"})
    finished = future.result(60)
    assert refused.status_code == 409 and "in flight" in refused.json()["error"]["message"]
    assert finished.status_code == 200 and finished.json()["usage"]["completion_tokens"] == 200  # not corrupted
    assert _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "busy"}).status_code == 200


def test_concurrent_requests_to_different_adapters(lora_server: InProcessServer, adapters: dict[str, str]) -> None:
    _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "beta2", "lora_path": adapters["beta"]})
    models = ["tiny", "alpha", "beta2"] * 3
    alone = {m: _complete(lora_server, m, "The quick brown fox").json()["choices"][0]["text"] for m in set(models)}

    async def together() -> list[httpx.Response]:
        body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        return list(await asyncio.gather(*(
            lora_server.client.post("/v1/completions", json={**body, "model": m}, headers=AUTH) for m in models
        )))  # fmt: skip

    responses = lora_server.run(together())
    assert [r.json()["choices"][0]["text"] for r in responses] == [alone[m] for m in models]
    assert len(set(alone.values())) == 3
    metrics = lora_server.run(lora_server.client.get("/metrics")).text
    assert 'kvik:request_success_total{finished_reason="length",model_name="beta2"}' in metrics


def test_runtime_updates_are_off_by_default(tiny_model: Path, adapters: dict[str, str]) -> None:
    server = InProcessServer(tiny_model, ServerSettings(served_model_name="tiny"), enable_lora=True, max_lora_rank=8)
    try:
        response = server.post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": adapters["alpha"]})
        assert response.status_code == 404 and "--allow-runtime-lora-updating" in response.json()["error"]["message"]
    finally:
        server.close()
    with pytest.raises(ValueError, match="--lora-modules needs --enable-lora"):
        InProcessServer(tiny_model, ServerSettings(served_model_name="tiny", lora_modules=(f"a={adapters['alpha']}",)))
