"""Schema-driven fuzzing of every route in the OpenAPI document (schemathesis + hypothesis): valid and
invalid requests alike never get a 5xx, and every error is OpenAI-shaped JSON.

One in-process server with the tiny model; generated ``max_tokens`` / ``n`` are clamped so requests that
reach the engine stay cheap (the whole file runs in well under a minute on 2 cores).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from server_harness import InProcessServer

# Examples per operation and mode: routes with request bodies get the most.
EXAMPLES = {"GET": 15, "POST": 60}
# Field values that make a request expensive without exercising anything new are clamped to these.
CHEAP = {"max_tokens": 6, "max_completion_tokens": 6, "min_tokens": 6, "n": 2, "best_of": 2}


@pytest.fixture(scope="module")
def app_server(tiny_model: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tiny_model)
    yield server
    server.close()


@pytest.fixture(scope="module")
def schema(app_server: InProcessServer) -> Any:
    return schemathesis.openapi.from_dict(app_server.get("/openapi.json").json())


def cheap(body: Any) -> Any:
    if isinstance(body, dict):
        for name, cap in CHEAP.items():
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and cap < value <= 4096:
                body[name] = cap
    return body


def send(server: InProcessServer, case: Any) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url="http://kvik")
    content: bytes | None = None
    if "json" in kwargs:
        content = json.dumps(cheap(kwargs["json"])).encode()  # NaN/Infinity pass as the server's parser reads them
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        content = data if isinstance(data, bytes) else str(data).encode("utf-8", "surrogatepass")
    request = server.client.request(
        kwargs["method"], kwargs["url"], params=kwargs.get("params"), headers=dict(kwargs["headers"]), content=content
    )
    return server.run(request)


def check(response: httpx.Response, label: str) -> None:
    assert response.status_code < 500, (label, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (label, error)


def test_every_route_is_in_the_document(schema: Any, app_server: InProcessServer) -> None:
    documented = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    served = {(method, route.path.replace(":path", "")) for route in app_server.app.routes
              for method in getattr(route, "methods", ()) if route.include_in_schema}  # fmt: skip
    assert served - {("HEAD", path) for _, path in served} <= documented


def fuzz_operation(server: InProcessServer, operation: Any, mode: GenerationMode) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @settings(max_examples=EXAMPLES.get(operation.method.upper(), 15), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        check(send(server, case), label)

    fuzz()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_route_answers_5xx(schema: Any, app_server: InProcessServer, mode: GenerationMode) -> None:
    for result in schema.get_all_operations():
        operation = result.ok()
        spec = schema.raw_schema["paths"][operation.path][operation.method.lower()]
        if mode is GenerationMode.NEGATIVE and "requestBody" not in spec:
            continue  # no body: nothing to make invalid (any string is a valid model id)
        fuzz_operation(app_server, operation, mode)
    still_fine = app_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2})  # fmt: skip
    assert still_fine.status_code == 200
