"""Load progress: what the engine is doing while it starts, and how long each part took.

Three modes, picked once per engine start (``KVIK_PROGRESS=0`` silences it, ``=1`` forces steps):

* INFO logging on (``kvik serve``, ``--log-level info``): each step is logged when it
  starts and when it ends, with its time, then the summary: no silent gap in the log;
* stderr is a terminal: one line per step (``kvik: loading model ... 6.2 s``), then the summary;
* otherwise: only the summary line (``kvik: ready in 9.1 s: model 257 MiB, KV cache ...``).

The loader and runners mark their own phases with :func:`step` (reading weights,
dequantizing, capturing graphs): a no-op unless an engine start is being reported.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

logger = logging.getLogger("kvik.engine.progress")


class LoadProgress:
    """Reports the steps of one engine start (see the module docstring for the modes)."""

    def __init__(self, stream: TextIO | None = None, mode: str | None = None) -> None:
        self.stream = stream or sys.stderr
        self.mode = mode or _default_mode(self.stream)  # "log", "steps", "summary" or "off"
        self.start = time.monotonic()
        self._depth = 0
        self._open_line = False  # a step line waiting for its time

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self._begin(name)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self._end(name, time.monotonic() - started)

    def interrupt(self) -> None:
        """Someone else (a progress bar) is about to write to the terminal: end the open line."""
        if self._open_line:
            self._write("\n")
            self._open_line = False

    @classmethod
    def begin(cls, stream: TextIO | None = None, mode: str | None = None) -> LoadProgress:
        """Start reporting an engine start: :func:`step` calls go here until :meth:`finish`.

        (If the start fails, the next ``begin`` replaces this one; no try/finally needed.)
        """
        global _active
        progress = cls(stream, mode)
        _active = progress
        return progress

    def finish(self, text: str) -> str:
        """Stop reporting and write the summary line (``ready in 9.1 s: <text>``); returns it."""
        global _active
        if _active is self:
            _active = None
        return self.summary(text)

    def summary(self, text: str) -> str:
        line = f"ready in {time.monotonic() - self.start:.1f} s: {text}"
        if self.mode == "log":
            logger.info("%s", line)
        elif self.mode in ("steps", "summary"):
            self.interrupt()
            self._write(f"kvik: {line}\n")
        return line

    def _begin(self, name: str) -> None:
        if self.mode == "log":
            logger.info("%s%s ...", "  " * self._depth, name)
        elif self.mode == "steps":
            self.interrupt()
            self._write(f"kvik: {'  ' * self._depth}{name} ... ")
            self._open_line = True

    def _end(self, name: str, seconds: float) -> None:
        if self.mode == "log":
            logger.info("%s%s: %.1f s", "  " * self._depth, name, seconds)
        elif self.mode == "steps":
            if self._open_line:
                self._write(f"{seconds:.1f} s\n")
                self._open_line = False
            else:
                self._write(f"kvik: {'  ' * self._depth}{name}: {seconds:.1f} s\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _default_mode(stream: TextIO) -> str:
    forced = os.environ.get("KVIK_PROGRESS", "").strip().lower()
    if forced in ("0", "off", "false", "no"):
        return "off"
    if logging.getLogger("kvik").isEnabledFor(logging.INFO):
        return "log"
    if forced in ("1", "on", "true", "yes") or _isatty(stream):
        return "steps"
    return "summary"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# The engine start being reported (engines start one at a time in a process).
_active: LoadProgress | None = None


@contextmanager
def step(name: str) -> Iterator[None]:
    """Mark a phase of the current engine start (a no-op when none is being reported)."""
    if _active is None:
        yield
        return
    with _active.step(name):
        yield


def interrupt() -> None:
    """A progress bar is about to draw: end any open step line first."""
    if _active is not None:
        _active.interrupt()


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{n} B"


def format_tokens(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else str(n)
