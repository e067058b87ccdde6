"""Server answers a newcomer meets: structured_outputs (vLLM >= 0.10), a missing backend as 501 with
the install hint in the operator's log, image parts refused by name, 4xx logged once, no paths in /v1/models."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_in_process import InProcessServer

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Pick one"}], "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def app(tiny_model: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tiny_model)
    yield server
    server.close()


def test_structured_outputs_extra_field_constrains_the_answer(app):
    pytest.importorskip("xgrammar")
    body = {**CHAT, "structured_outputs": {"choice": ["red", "green"]}}
    reply = app.post("/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] in ("red", "green")
    both = app.post("/v1/chat/completions", {**body, "guided_regex": "a+"})
    assert both.status_code == 400 and "at most one" in both.json()["error"]["message"]
    unknown = app.post("/v1/chat/completions", {**CHAT, "structured_outputs": {"xml": "<a/>"}})
    assert unknown.status_code == 400 and "json, regex, choice" in unknown.json()["error"]["message"]


def test_a_missing_backend_is_501_for_the_client_and_an_install_hint_for_the_operator(
    tiny_model, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now fails, as when not installed
    server = InProcessServer(tiny_model)  # a fresh engine: its backend is built on first use
    try:
        with caplog.at_level(logging.INFO, logger="kvik_server"):
            reply = server.post("/v1/chat/completions", {**CHAT, "structured_outputs": {"regex": "[0-9]+"}})
        assert reply.status_code == 501, reply.text
        error = reply.json()["error"]
        assert "not enabled on this server" in error["message"] and "pip" not in error["message"]
        assert error["code"] == "feature_not_enabled"
        assert any("pip install 'kvik-core[structured]'" in r.getMessage() for r in caplog.records)
        assert server.post("/v1/chat/completions", CHAT).status_code == 200  # everyone else is still served
    finally:
        server.close()


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])  # fmt: skip
def test_media_content_parts_are_refused_by_name(app, part):
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]}
    reply = app.post("/v1/chat/completions", body)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    kind = "image" if part["type"] == "image_url" else "audio"
    assert f"{kind} inputs are not supported" in message and "valid string" not in message


def test_every_client_error_is_logged_once_at_info_with_its_reason(app, caplog):
    with caplog.at_level(logging.INFO, logger="kvik_server"):
        reply = app.post("/v1/chat/completions", {**CHAT, "temperature": -3})
    assert reply.status_code == 400
    lines = [r for r in caplog.records if r.name.startswith("kvik_server") and "answered 400" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "temperature" in lines[0].getMessage()


def test_models_list_does_not_show_filesystem_paths(app, tiny_model):
    reply = app.run(app.client.get("/v1/models"))
    card = reply.json()["data"][0]
    assert card["root"] == tiny_model.name and "/" not in card["root"]


def test_sigterm_exits_right_after_the_server_stops_and_logs_share_one_format(start_server):
    import datetime
    import re
    import signal
    import time

    server = start_server("--log-level", "info", api_key=None)
    assert server.client().post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    while server.proc.poll() is None:
        time.sleep(0.01)
    exited = time.time()
    assert server.proc.returncode == 0
    log = server.log_path.read_text()
    last = [line for line in log.splitlines() if "server stopped; exiting" in line]
    assert len(last) == 1, log[-2000:]
    stamp = datetime.datetime.strptime(last[0][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    # No interpreter teardown after the last line (it took seconds with the real model).
    assert exited - stamp < 1.0, f"the process lived {exited - stamp:.2f} s after its last log line"
    line_format = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|DEBUG) [\w.]+: ")
    uvicorn_lines = [line for line in log.splitlines() if "uvicorn" in line]
    assert uvicorn_lines and all(line_format.match(line) for line in uvicorn_lines), uvicorn_lines[:3]
