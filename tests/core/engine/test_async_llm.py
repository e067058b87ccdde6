"""AsyncLLM: streaming, concurrency, aborts, and errors across the thread boundary."""

from __future__ import annotations

import asyncio

import pytest
from kvik import LLM, SamplingParams
from kvik.engine.async_llm import AsyncLLM
from kvik.testing.reference import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def _engine(path: str, async_scheduling: bool = False) -> AsyncLLM:
    return AsyncLLM.from_engine_args(
        model=path,
        device="cpu",
        dtype="float32",
        num_kv_blocks=128,
        max_model_len=256,
        async_scheduling=async_scheduling,
    )


OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async-scheduling"])


@OVERLAP
def test_concurrent_streams_match_offline(model_path, overlap):
    prompts = random_prompts(6, seed=5)
    offline = [
        o.outputs[0].token_ids
        for o in LLM(model_path, device="cpu", dtype="float32", num_kv_blocks=128, max_model_len=256).generate(
            prompts, GREEDY
        )
    ]

    async def main():
        engine = _engine(model_path, overlap)

        async def one(i, p):
            seen = []
            async for out in engine.generate(p, GREEDY, request_id=f"r{i}"):
                seen.append(len(out.outputs[0].token_ids))
                last = out
            assert seen == sorted(seen) and last.finished
            return last.outputs[0].token_ids

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await engine.shutdown()

    assert asyncio.run(main()) == offline


@OVERLAP
def test_leaving_early_aborts_and_frees_blocks(model_path, overlap):
    async def main():
        engine = _engine(model_path, overlap)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            async for out in engine.generate([5, 6, 7, 8], params, request_id="gone"):
                if len(out.outputs[0].token_ids) >= 3:
                    break
            for _ in range(100):
                await asyncio.sleep(0.02)
                stats = engine.get_stats()
                if stats.num_running == 0 and stats.kv_cache_usage == 0.0:
                    break
            assert engine.get_stats().num_running == 0
            assert engine.get_stats().kv_cache_usage == 0.0
            # Still serving afterwards.
            outs = [out async for out in engine.generate([5, 6], GREEDY, request_id="next")]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == GREEDY.max_tokens
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_invalid_request_raises_before_streaming(model_path):
    async def main():
        engine = _engine(model_path)
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                async for _ in engine.generate([5] * 300, GREEDY, request_id="long"):
                    pass
            assert engine.is_healthy()
        finally:
            await engine.shutdown()

    asyncio.run(main())
