"""The heap that exists before a batch of work, kept out of the garbage collector's sight while it runs.

A process running kvik holds a large, long-lived heap: every imported module (torch, transformers, ...),
the model's and the tokenizer's Python objects, the caller's own data. The requests' objects trigger full
(generation-2) collections now and then, and each one walks all of that heap while holding the GIL, so the
engine's steps stop for it: 0.38 s per collection on the development VM with a tiny model (418k tracked
objects). On the H200, 2,000 SmolLM2-shaped requests x 256 tokens ran 16 full collections taking 0.6 s of a
9 s call; frozen, 15 took 0.1 s (docs/benchmarks.md, run i4). Frozen (``gc.freeze``), that heap is skipped
until the work ends. vLLM freezes its engine's heap after start-up for the same reason; ``kvik serve`` does
too (kvik_server.cli).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze every object alive now for the block's duration; a process's own earlier freeze stays as it was.

    Objects the block creates are collected as usual. Garbage among the frozen objects (cycles the caller
    dropped just before) waits for the first collection after the block."""
    frozen_before = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()
