"""The built-in chat page (kvik_server/ui) in a real browser: Chromium from the OS packages driven by
Playwright for Python, against `kvik serve` with the bundled SmolLM2 model.

Skipped, saying why, when Playwright or a Chromium binary is missing (CI installs both: .ci/run,
the dev extra). Set KVIK_UI_SCREENSHOTS=DIR to keep the screenshots the test takes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kvik_server.context import ServerSettings
from server_harness import API_KEY, InProcessServer, ServerProcess

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    return os.environ.get("KVIK_CHROMIUM") or next(filter(None, map(shutil.which, _BROWSERS)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
    )
    executable = chromium_path()
    if executable is None:
        pytest.skip(f"no Chromium binary found (looked for {', '.join(_BROWSERS)} on PATH and $KVIK_CHROMIUM); "
                    "install one, e.g. apt-get install chromium")  # fmt: skip
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture()
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("KVIK_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_chat_streams_and_stop_aborts_on_the_server(browser: Any, smollm_server: ServerProcess, shots: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(smollm_server.base_url + "/")
    # The server needs a key: the page says so and puts the focus in the key field.
    page.get_by_role("alert").filter(has_text="needs an API key").wait_for()
    assert page.evaluate("document.activeElement.id") == "api-key"
    # Sending without the key: the 401 gives the message back to the box and points at the key again.
    page.get_by_label("Message", exact=True).fill("hello")
    page.get_by_label("Message", exact=True).press("Enter")
    # (polled from here: Playwright's wait_for_function evaluates strings, which the page's CSP forbids)
    wait_until(lambda: page.evaluate("document.activeElement.id") == "api-key", 10, "the focus on the key field")
    assert page.get_by_label("Message", exact=True).input_value() == "hello"
    assert page.locator("article.msg").count() == 0
    assert page.get_by_role("alert").filter(has_text="needs an API key").is_visible()
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("API key").press("Tab")  # change event: the page lists the models with the key
    page.locator("#model option[value='smollm2']").wait_for(state="attached")
    assert page.get_by_role("alert").is_hidden()

    page.get_by_label("System prompt").fill("You are a storyteller who writes very long stories.")
    page.get_by_label("Max tokens").fill("3000")
    box = page.get_by_label("Message", exact=True)
    box.fill("Tell me a long story about a dragon")
    box.press("Shift+Enter")  # a new line, not a send
    assert page.locator("article.msg").count() == 0
    box.type("who learns to cook.")
    box.press("Enter")

    reply = page.locator("article.msg.assistant .body")
    page.locator("article.msg.user").filter(has_text="who learns to cook.").wait_for()
    wait_until(lambda: len(reply.inner_text()) > 0, 20, "the first streamed token")
    seen = len(reply.inner_text())
    wait_until(lambda: len(reply.inner_text()) > seen + 10, 20, "more tokens streaming in")
    assert smollm_server.metrics()["kvik:num_requests_running"] == 1
    assert page.get_by_role("button", name="Send").is_disabled()
    page.screenshot(path=str(shots / "chat-desktop.png"))

    page.get_by_role("button", name="Stop").click()
    page.locator("article.msg.assistant .meta").filter(has_text="stopped").wait_for(timeout=10_000)
    # Closing the stream aborted the request in the engine: nothing runs and no tokens are generated.
    wait_until(lambda: smollm_server.metrics()["kvik:num_requests_running"] == 0, 10, "running requests back to 0")
    metrics = smollm_server.metrics()
    assert metrics["kvik:num_requests_inflight"] == 0
    generated = metrics["kvik:generation_tokens_total"]
    time.sleep(0.5)
    assert smollm_server.metrics()["kvik:generation_tokens_total"] == generated
    assert page.get_by_role("button", name="Send").is_enabled()
    # The live panel read /metrics: the KV-cache figure is a percentage.
    assert page.locator("#m-kv").inner_text().endswith("%")

    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(shots / "chat-phone.png"))
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
    page.close()


MALICIOUS = [
    '<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>\n',
    "[click](javascript:window.__pwned=3) and [docs](https://example.com/a?b=1)\n\n## A heading\n- one\n- *two*\n",
    '**bold <b>x</b>** and `<i>code</i>`\n\n```html\n<svg onload="window.__pwned=4"></svg>\n```\n',
]


def test_model_output_cannot_inject_html(browser: Any, smollm_server: ServerProcess, shots: Path) -> None:
    """A hostile reply (here served by a stand-in for the completions route) renders as text."""
    page = browser.new_page()
    stream = (
        "".join(
            "data: "
            + json.dumps({"choices": [{"index": 0, "delta": {"content": part}, "finish_reason": None}]})
            + "\n\n"
            for part in MALICIOUS
        )
        + "data: [DONE]\n\n"
    )
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=stream))  # fmt: skip
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(smollm_server.base_url + "/")
    page.get_by_label("Message", exact=True).fill("hi")
    page.get_by_label("Message", exact=True).press("Enter")
    body = page.locator("article.msg.assistant .body")
    page.locator("article.msg.assistant .meta").filter(has_text="tokens").wait_for()
    assert page.evaluate("window.__pwned") is None and not dialogs
    assert body.locator("img, script, svg, b, i").count() == 0
    assert "<img src=x" in body.inner_text() and "<svg onload=" in body.inner_text()
    links = body.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/a?b=1"
    assert "[click](javascript:" in body.inner_text()
    assert body.locator("strong").inner_text() == "bold <b>x</b>"
    assert body.locator("pre code.language-html").count() == 1
    page.screenshot(path=str(shots / "chat-markdown.png"))
    page.close()


def test_no_ui_turns_the_page_off(tiny_model: Path) -> None:
    on = InProcessServer(tiny_model, ServerSettings(served_model_name="tiny"))
    try:
        page = on.get("/")
        assert page.status_code == 200 and "<title>kvik chat</title>" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert on.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
        assert on.get("/ui/../pyproject.toml").status_code == 404
        assert on.get("/ui/__init__.py").status_code == 404
        assert "/" not in on.get("/openapi.json").json()["paths"]
    finally:
        on.close()
    off = InProcessServer(tiny_model, ServerSettings(served_model_name="tiny", ui=False))
    try:
        assert off.get("/").status_code == 404
        assert off.get("/ui/app.js").status_code == 404
        assert off.get("/v1/models").status_code == 200
    finally:
        off.close()


def test_no_ui_flag() -> None:
    from kvik_server.cli import parse_serve_args

    assert ServerSettings.from_args(parse_serve_args(["--model", "m"])).ui is True
    assert ServerSettings.from_args(parse_serve_args(["--model", "m", "--no-ui"])).ui is False
