"""Data parallelism: two in-process replicas behind the router give one engine's outputs, spread the load,
keep a prompt prefix on one replica, route aborts to the owner and merge their statistics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kvik import LLM, SamplingParams
from kvik.engine.data_parallel import DataParallelLLM, merge_stats
from kvik.engine.llm_engine import EngineStats

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def loop() -> Any:
    # One event loop for the module: the replicas' step threads post outputs to the loop they started on.
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def router(tiny_model_dir: Any, loop: asyncio.AbstractEventLoop) -> Any:
    model = str(tiny_model_dir("llama"))
    dp = DataParallelLLM.from_engine_args(2, "least_loaded", model=model, device="cpu", num_kv_blocks=64,
                                          num_threads=1)  # fmt: skip
    yield dp, model, loop
    loop.run_until_complete(dp.shutdown())


def _collect(dp: DataParallelLLM, prompts: list[list[int]], loop: asyncio.AbstractEventLoop) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        last = None
        async for out in dp.generate(prompt, PARAMS, f"r{i}"):
            last = out
        assert last is not None and last.finished
        return list(last.outputs[0].token_ids)

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return loop.run_until_complete(main())


def test_replicas_give_one_engines_tokens_and_share_the_load(router: Any) -> None:
    dp, model, loop = router
    prompts = [[5 + i, 17, 30 + i, 9] for i in range(8)]
    got = _collect(dp, prompts, loop)
    single = LLM(model=model, device="cpu", num_kv_blocks=64, num_threads=1)
    want = [list(o.outputs[0].token_ids) for o in single.generate(prompts, PARAMS, use_tqdm=False)]
    single.llm_engine.shutdown()
    assert got == want
    per_replica = [r.engine.get_stats().generation_tokens_total for r in dp.replicas]
    assert all(n > 0 for n in per_replica), per_replica  # least-loaded routing used both
    assert dp.get_stats().generation_tokens_total == sum(per_replica) == 8 * 8
    assert dp.is_healthy() and dp.error is None and dp.num_unfinished == 0


def test_prefix_routing_keeps_a_shared_prefix_on_one_replica(router: Any) -> None:
    dp, _, _ = router
    prefix_router = DataParallelLLM(dp.replicas, "prefix")
    system = list(range(3, 70))  # longer than the hashed prefix
    chosen = {id(prefix_router.pick([*system, 100 + i])) for i in range(20)}
    assert len(chosen) == 1
    spread = {id(prefix_router.pick([200 + i, 7, 8])) for i in range(40)}
    assert len(spread) == 2  # different prefixes still use both replicas
    with pytest.raises(ValueError, match="routing must be one of"):
        DataParallelLLM(dp.replicas, "random")


def test_abort_reaches_the_replica_that_owns_the_request(router: Any) -> None:
    dp, _, loop = router

    async def main() -> None:
        stream = dp.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), "long")
        await stream.__anext__()
        owner = dp._owner["long"]
        await dp.abort("long")
        await stream.aclose()
        for _ in range(100):
            if owner.engine.get_stats().num_running == 0:
                break
            await asyncio.sleep(0.02)
        assert owner.engine.get_stats().num_running == 0 and "long" not in dp._owner

    loop.run_until_complete(main())


def test_merged_statistics() -> None:
    a = EngineStats(1, 2, 0.2, 10, 5, 1, 100, 50, 7, 3.0, 4, 2, (2, 1))
    b = EngineStats(3, 0, 0.6, 20, 5, 0, 10, 5, 3, 9.0, 0, 0, (1,))
    m = merge_stats([a, b])
    assert (m.num_running, m.num_waiting, m.prefix_cache_queries, m.generation_tokens_total) == (4, 2, 30, 55)
    assert m.kv_cache_usage == pytest.approx(0.4) and m.last_step_time == 9.0
    assert m.spec_accepted_per_position == (3, 1)


def test_least_loaded_ties_take_turns(router: Any) -> None:
    dp, _, _ = router
    assert {id(dp.pick([1, 2])) for _ in range(4)} == {id(r) for r in dp.replicas}  # idle: one each in turn
