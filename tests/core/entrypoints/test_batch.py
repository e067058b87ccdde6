"""run-batch's held first window (kvik.entrypoints.batch.first_window_in); the end-to-end runs are in
tests/server/test_run_batch.py (they need the server package)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from kvik.entrypoints.batch import first_window_in


def test_returns_once_the_window_is_in_counting_answered_lines() -> None:
    engine = SimpleNamespace(num_unfinished=0)
    answered = [0]

    async def main() -> float:
        async def arrive() -> None:
            for _ in range(3):
                await asyncio.sleep(0.01)
                engine.num_unfinished += 1
            answered[0] += 2  # two refused lines: answered without reaching the engine

        feeder = asyncio.ensure_future(arrive())
        t = time.perf_counter()
        await first_window_in(engine, answered, 5, stall_s=5.0)
        await feeder
        return time.perf_counter() - t

    assert asyncio.run(main()) < 2.0
    assert engine.num_unfinished + answered[0] == 5


def test_a_stalled_window_is_let_go() -> None:
    """A line stuck in a slow render must not hold the engine for the lines already in."""
    engine = SimpleNamespace(num_unfinished=3)

    async def main() -> float:
        t = time.perf_counter()
        await first_window_in(engine, [0], 10, stall_s=0.1)
        return time.perf_counter() - t

    assert 0.1 <= asyncio.run(main()) < 2.0
