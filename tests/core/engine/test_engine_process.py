"""An engine in a child process (kvik.engine.engine_process): the same outputs, aborts, errors and pooling
as the engine on a thread, and a child that dies or is left behind fails loudly and goes away."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from kvik import LLM, SamplingParams
from kvik.engine.async_llm import AsyncLLM, EngineDeadError
from kvik.engine.engine_process import EngineProcess, ProcessAsyncLLM
from kvik.lora.request import LoRARequest
from kvik.pooling.params import PoolingParams
from kvik.testing.reference import random_prompts
from kvik.testing.tiny_encoders import make_tiny_encoder

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=128, max_model_len=256)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def _engine(path: str, **overrides) -> AsyncLLM:
    return AsyncLLM.from_engine_args(model=path, engine_process=True, **{**ENGINE, **overrides})


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async-scheduling"])
def test_streams_match_the_engine_in_this_process(model_path, overlap):
    prompts = random_prompts(6, seed=11)
    offline = LLM(model_path, **ENGINE).generate(prompts, GREEDY)

    async def main():
        engine = _engine(model_path, async_scheduling=overlap)
        assert isinstance(engine, ProcessAsyncLLM) and engine.engine.process.is_alive()

        async def one(i, p):
            seen = []
            async for out in engine.generate(p, GREEDY, request_id=f"r{i}"):
                seen.append(len(out.outputs[0].token_ids))
                last = out
            assert seen == sorted(seen) and last.finished
            return last

        try:
            outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            stats = engine.get_stats()
            assert stats.generation_tokens_total == len(prompts) * GREEDY.max_tokens
            return outs
        finally:
            await engine.shutdown()
            assert not engine.engine.process.is_alive()

    got = asyncio.run(main())
    for mine, ref in zip(got, offline, strict=True):
        assert mine.outputs[0].token_ids == ref.outputs[0].token_ids
        assert mine.outputs[0].text == ref.outputs[0].text
        # The requests may meet in other batches than offline: float32 rounding, not bits.
        for step_mine, step_ref in zip(mine.outputs[0].logprobs, ref.outputs[0].logprobs, strict=True):
            assert step_mine.keys() == step_ref.keys()
            for token, lp in step_mine.items():
                assert lp.rank == step_ref[token].rank
                assert lp.logprob == pytest.approx(step_ref[token].logprob, abs=1e-5)


def test_validation_on_the_callers_side_and_aborts_in_the_child(model_path):
    async def main():
        engine = _engine(model_path)
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                async for _ in engine.generate([5] * 300, GREEDY, request_id="long"):
                    pass
            with pytest.raises(ValueError, match="outside the vocabulary"):
                async for _ in engine.generate([10**9], GREEDY, request_id="bad-id"):
                    pass
            with pytest.raises(ValueError, match="logits_processors"):
                params = SamplingParams(max_tokens=2, logits_processors=[lambda ids, logits: logits])
                async for _ in engine.generate([5, 6], params, request_id="callable"):
                    pass
            with pytest.raises(ValueError, match="LoRA is off"):
                engine.check_lora_blocking(LoRARequest("a", 1, "/nowhere"))
            # Leaving a stream early aborts it in the child, which frees its blocks.
            long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            async for out in engine.generate([5, 6, 7, 8], long, request_id="gone"):
                if len(out.outputs[0].token_ids) >= 3:
                    break
            for _ in range(200):
                await asyncio.sleep(0.02)
                stats = engine.get_stats()
                if stats.num_running == 0 and stats.kv_cache_usage == 0.0:
                    break
            assert engine.get_stats().num_running == 0 and engine.get_stats().kv_cache_usage == 0.0
            outs = [out async for out in engine.generate([5, 6], GREEDY, request_id="next")]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == GREEDY.max_tokens
            assert engine.is_healthy()
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_child_that_dies_fails_its_requests_loudly(model_path):
    async def main():
        engine = _engine(model_path)
        try:
            long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            stream = engine.generate([5, 6, 7], long, request_id="victim")
            first = await stream.__anext__()
            assert not first.finished
            os.kill(engine.engine.process.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="exited unexpectedly"):
                async for _ in stream:
                    pass
            assert not engine.is_healthy()
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate([5], GREEDY, request_id="after"):
                    pass
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_start_that_fails_raises_the_childs_error(tmp_path):
    with pytest.raises(ValueError, match="max_model_len"):
        EngineProcess({"model": None, "device": "cpu", "max_model_len": -5})
    with pytest.raises(Exception, match=str(tmp_path / "absent")):
        EngineProcess({"model": str(tmp_path / "absent"), "device": "cpu"})


def test_the_child_exits_when_its_caller_lets_go(model_path):
    handle = EngineProcess({"model": model_path, **ENGINE})
    process = handle.process
    assert process.is_alive()
    handle._finalizer()  # what garbage collection or interpreter exit does: the command pipe closes
    process.join(30)
    assert not process.is_alive() and process.exitcode == 0


def test_pooling_through_the_child(tmp_path):
    path = str(make_tiny_encoder(tmp_path / "bert", "bert", "mean", True))
    texts = ["a short text", "another one that is a little longer", "x"]
    engine_args = dict(runner="pooling", device="cpu", dtype="float32", num_threads=1)
    ref = LLM(path, **engine_args).embed(texts)

    async def main():
        engine = AsyncLLM.from_engine_args(model=path, engine_process=True, **engine_args)
        try:
            assert engine.engine.pooling_task == "embed"
            return await engine.encode_batch(texts, PoolingParams(task="embed"), ["a", "b", "c"])
        finally:
            await engine.shutdown()

    got = asyncio.run(main())
    assert [g.outputs.data for g in got] == [r.outputs.embedding for r in ref]


def test_stats_reach_the_caller_without_outputs(model_path):
    """final_only requests send nothing until they finish: the running count still arrives."""

    async def main():
        engine = _engine(model_path)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True, output_kind="final_only")
            task = asyncio.ensure_future(_last(engine.generate([5, 6, 7], params, request_id="quiet")))
            deadline = time.monotonic() + 30
            while engine.get_stats().num_running == 0 and not task.done():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert task.done() or engine.get_stats().num_running == 1
            out = await task
            assert out.finished and len(out.outputs[0].token_ids) == 150
        finally:
            await engine.shutdown()

    asyncio.run(main())


async def _last(stream):
    last = None
    async for out in stream:
        last = out
    return last
