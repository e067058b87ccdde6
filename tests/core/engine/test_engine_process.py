"""An engine in a child process (kvik.engine.engine_process): what only it can do wrong. A child that dies,
fails to start or is left behind fails loudly and goes away; pooling and stats cross the pipe; what cannot
cross is refused. Its streams, aborts and outputs against the engine on a thread: test_async_llm.py."""

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
from kvik.testing.tiny_encoders import make_tiny_encoder

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=128, max_model_len=256)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def _engine(path: str, **overrides) -> AsyncLLM:
    return AsyncLLM.from_engine_args(model=path, engine_process=True, **{**ENGINE, **overrides})


def test_refusals_on_the_callers_side(model_path):
    """What only the child could run is refused before anything is sent; the engine keeps serving.
    (Streams, aborts and length checks: test_async_llm.py runs them on both placements.)"""

    async def main():
        engine = _engine(model_path)
        assert isinstance(engine, ProcessAsyncLLM) and engine.engine.process.is_alive()
        try:
            with pytest.raises(ValueError, match="outside the vocabulary"):
                async for _ in engine.generate([10**9], GREEDY, request_id="bad-id"):
                    pass
            with pytest.raises(ValueError, match="logits_processors"):
                params = SamplingParams(max_tokens=2, logits_processors=[lambda ids, logits: logits])
                async for _ in engine.generate([5, 6], params, request_id="callable"):
                    pass
            with pytest.raises(ValueError, match="LoRA is off"):
                engine.check_lora_blocking(LoRARequest("a", 1, "/nowhere"))
            outs = [out async for out in engine.generate([5, 6], GREEDY, request_id="next")]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == GREEDY.max_tokens
            assert engine.is_healthy()
        finally:
            await engine.shutdown()
            assert not engine.engine.process.is_alive()

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
