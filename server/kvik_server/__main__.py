"""``python -m kvik_server --model PATH ...`` (same flags as ``kvik serve``)."""

from __future__ import annotations

from kvik_server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
