"""AsyncLLM: streaming, concurrency, aborts, and errors across the thread boundary, with the engine on a thread
and in a child process (kvik.engine.engine_process; its own failure modes: test_engine_process.py)."""

from __future__ import annotations

import asyncio

import pytest
from kvik import LLM, SamplingParams
from kvik.engine.async_llm import AsyncLLM
from kvik.testing.reference import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def _engine(path: str, async_scheduling: bool = False, engine_process: bool = False) -> AsyncLLM:
    return AsyncLLM.from_engine_args(
        model=path,
        device="cpu",
        dtype="float32",
        num_kv_blocks=128,
        max_model_len=256,
        async_scheduling=async_scheduling,
        engine_process=engine_process,
    )


OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async-scheduling"])
PLACES = pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])


@PLACES
@OVERLAP
def test_concurrent_streams_match_offline(model_path, overlap, engine_process):
    prompts = random_prompts(6, seed=5)
    offline = LLM(model_path, device="cpu", dtype="float32", num_kv_blocks=128, max_model_len=256).generate(
        prompts, GREEDY
    )

    async def main():
        engine = _engine(model_path, overlap, engine_process)

        async def one(i, p):
            seen = []
            async for out in engine.generate(p, GREEDY, request_id=f"r{i}"):
                seen.append(len(out.outputs[0].token_ids))
                last = out
            assert seen == sorted(seen) and last.finished
            return last

        try:
            outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            if engine_process:  # its stats come with the outputs (on a thread they follow them, a moment later)
                assert engine.get_stats().generation_tokens_total == len(prompts) * GREEDY.max_tokens
            return outs
        finally:
            await engine.shutdown()

    for mine, ref in zip(asyncio.run(main()), offline, strict=True):
        assert mine.outputs[0].token_ids == ref.outputs[0].token_ids
        assert mine.outputs[0].text == ref.outputs[0].text
        # The requests may meet in other batches than offline: float32 rounding, not bits.
        for step_mine, step_ref in zip(mine.outputs[0].logprobs, ref.outputs[0].logprobs, strict=True):
            assert step_mine.keys() == step_ref.keys()
            for token, lp in step_mine.items():
                assert lp.rank == step_ref[token].rank
                assert lp.logprob == pytest.approx(step_ref[token].logprob, abs=1e-5)


@PLACES
@OVERLAP
def test_leaving_early_aborts_and_frees_blocks(model_path, overlap, engine_process):
    async def main():
        engine = _engine(model_path, overlap, engine_process)
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


@PLACES
def test_invalid_request_raises_before_streaming(model_path, engine_process):
    async def main():
        engine = _engine(model_path, engine_process=engine_process)
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                async for _ in engine.generate([5] * 300, GREEDY, request_id="long"):
                    pass
            assert engine.is_healthy()
        finally:
            await engine.shutdown()

    asyncio.run(main())
