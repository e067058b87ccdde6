"""The built-in chat page: ``GET /`` and its static files under ``/ui/``.

Plain HTML/JS/CSS shipped as package data (``static/``): no build step and nothing fetched
from the internet at run time. The page talks to the server's own public API
(``/v1/models``, ``/v1/chat/completions`` streamed, ``/metrics``), so it needs no routes of
its own beyond these. ``kvik serve --no-ui`` leaves them out (``/`` is then a 404).

Every UI response carries a Content-Security-Policy that allows only this origin's scripts
and styles and no inline code: a second wall behind the page's own rule of never parsing
model output as HTML (static/markdown.js).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

# The files the page is made of, with their media types; nothing else under static/ is served.
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time: after an upgrade the browser must not mix old and new files.
    "Cache-Control": "no-cache",
}


def load_static() -> dict[str, bytes]:
    """The page's files, read once from the installed package."""
    root = resources.files(__name__).joinpath("static")
    return {name: root.joinpath(name).read_bytes() for name in _FILES}


def install_ui(app: FastAPI) -> None:
    """Add ``GET /`` (the page) and ``GET /ui/{name}`` (its scripts and styles) to ``app``."""
    files = load_static()

    def serve(name: str) -> Response:
        return Response(files[name], media_type=_FILES[name], headers=SECURITY_HEADERS)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return serve("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def chat_page_file(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, f"no UI file named {name!r}")
        return serve(name)
