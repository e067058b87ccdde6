"""kvik's folder for things derived from a checkpoint that are slow to derive (a GGUF's index and tokenizer, an ONNX export).

Entries are keyed by what they were made from (path, size, mtime, the versions that shaped
them), written atomically, and safe to delete: a missing or damaged entry is made again.
A read-only location only costs the speed-up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$KVIK_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvik`` (``~/.cache/kvik``)."""
    root = os.environ.get("KVIK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvik"
    )
    return Path(root)


def cache_entry(kind: str, key: tuple[Any, ...], suffix: str = "") -> Path:
    """The path of the ``kind`` entry for ``key`` (a file or folder, which may not exist yet)."""
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
    return cache_dir() / kind / f"{digest}{suffix}"


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file and a rename (concurrent starts never read half of it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only location: the next start derives it again
        logger.info("could not write %s: %s", path, exc)


def write_folder_atomically(path: Path, fill: Callable[[Path], None]) -> None:
    """Make the folder ``path`` by ``fill``-ing a temporary folder beside it, then renaming it into place."""
    staging: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        fill(staging)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    except OSError as exc:
        logger.info("could not write %s: %s", path, exc)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
