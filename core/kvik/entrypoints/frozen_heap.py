"""The heap that exists before a batch of work, kept out of the garbage collector's sight while it runs.

A process running kvik holds a large, long-lived heap: every imported module (torch, transformers, ...),
the model's and the tokenizer's Python objects, the caller's own data. The requests' objects trigger full
(generation-2) collections now and then, and each one walks all of that heap while holding the GIL, so the
engine's steps stop for it: 0.38 s per collection on the development VM with a tiny model (418k tracked
objects). On the H200, 2,000 SmolLM2-shaped requests x 256 tokens ran 16 full collections taking 0.6 s of a
9 s call; frozen, 15 took 0.1 s (docs/benchmarks.md, run i4). Frozen (``gc.freeze``), that heap is skipped
until the work ends. vLLM freezes its engine's heap after start-up for the same reason; ``kvik serve`` does
too (kvik_server.cli).

While frozen, the young generation is also collected less often (``YOUNG_COLLECTION_THRESHOLD`` new
objects, not Python's 700). A decode step at 256 running requests makes over a thousand short-lived
containers (its scheduled requests, their token lists), so with the default every step ran one or two young
collections, each walking the step's live objects: ~276 collections per ``LLM.chat`` call of 258 steps on the
H100's host (run p1), and 12% of the CPU harness's step at 256 (1.17 -> 1.03 ms with the higher threshold,
docs/benchmarks.md). Cycles among the requests' objects wait a little longer for collection; memory
is not held meaningfully longer, since almost everything a step makes is freed by reference counting.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Young-generation collections happen after this many new tracked objects while the heap is frozen.
YOUNG_COLLECTION_THRESHOLD = 20_000

_lock = threading.Lock()
_depth = 0  # frozen_heap blocks open now, in any thread
# Whether the process had frozen objects of its own when a block first looked (the count is only read while
# this is False: ``gc.get_freeze_count`` walks every frozen object, ~50 ms per call on the H200's host, run j3).
# Once True, blocks freeze and never unfreeze, so the process's own freeze stays as it was.
_frozen_by_process = False
_thresholds: tuple[int, int, int] | None = None  # the collector's thresholds before the outermost block


def freeze_for_life() -> None:
    """Freeze the heap once and for all, in a process that lives for its engine (``kvik serve``, an engine
    child): everything alive now (modules, model, tokenizer) stays out of the collector's sight, and young
    collections are made rarer, for the rest of the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze every object alive now for the block's duration; a process's own earlier freeze stays as it was.

    Objects the block creates are collected as usual. Garbage among the frozen objects (cycles the caller
    dropped just before) waits for the first collection after the block. Blocks nest (the outermost one
    unfreezes) and may run in several threads at once."""
    global _depth, _frozen_by_process, _thresholds
    with _lock:
        if _depth == 0:
            if not _frozen_by_process:
                _frozen_by_process = gc.get_freeze_count() > 0  # cheap while nothing is frozen
            _thresholds = gc.get_threshold()
            gc.set_threshold(max(_thresholds[0], YOUNG_COLLECTION_THRESHOLD), *_thresholds[1:])
        _depth += 1
        gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if not _frozen_by_process:
                    gc.unfreeze()
                if _thresholds is not None:
                    gc.set_threshold(*_thresholds)
