"""kvik's OpenAI-compatible HTTP server.

``build_app(engine, args)`` makes the FastAPI app around an ``AsyncLLM``;
``add_serve_arguments(parser)`` and ``run_server(args)`` let the ``kvik`` CLI
mount ``kvik serve``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
