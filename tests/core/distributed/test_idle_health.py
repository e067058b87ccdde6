"""A rank that dies while the engine is idle fails the engine loop at once (not at the next request)."""

from __future__ import annotations


def test_an_idle_engine_loop_notices_a_dead_rank() -> None:
    """AsyncLLM checks the executor while idle, so /ready turns 503 without waiting for a request."""
    import asyncio
    import time

    from kvik.engine.async_llm import AsyncLLM
    from kvik.executor import ExecutorError

    class _Engine:  # the parts of LLMEngine the loop uses, with a rank that died
        def get_stats(self) -> None:
            return None

        def has_unfinished_requests(self) -> bool:
            return False

        def check_health(self) -> None:
            raise ExecutorError("worker rank 1 (pid 42) died with exit code -9")

        def shutdown(self) -> None:
            pass

    async def main() -> AsyncLLM:
        llm = AsyncLLM(_Engine(), model_name="stub")  # type: ignore[arg-type]
        llm.start()
        deadline = time.monotonic() + 5
        while llm.is_healthy() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return llm

    llm = asyncio.run(main())
    assert not llm.is_healthy() and "worker rank 1" in str(llm.error)
