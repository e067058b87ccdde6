"""Tensor and pipeline parallelism over the multiprocess executor (gloo, CPU, fp32): the same greedy
tokens as one device, and a killed worker fails the engine within seconds instead of hanging.

Each engine starts two worker processes (seconds each on two shared cores), so engines are
module fixtures shared by the tests that can share them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvik import LLM, SamplingParams
from kvik.executor import ExecutorError
from kvik.testing.tiny_models import make_tiny_model

PROMPTS = ["Hello world", "The quick brown fox jumps", "Once upon a time there was", "def main():"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
# Penalties read each request's prompt and output tokens: what the workers rebuild from deltas.
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, ignore_eos=True, seed=7, repetition_penalty=1.3,
                        presence_penalty=0.5)


def _engine_kwargs(path: Path) -> dict[str, Any]:
    return dict(model=str(path), device="cpu", dtype="float32", num_kv_blocks=96, num_threads=1, max_num_seqs=8)


def _run(llm: LLM, params: SamplingParams) -> list[Any]:
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One kv head for two ranks (replicated), q/k/v biases (sliced with their rows), a tied head
    # (the vocabulary-parallel embedding's slice): the column/row split's less common paths.
    return make_tiny_model(tmp_path_factory.mktemp("tp") / "qwen2", "qwen2", num_key_value_heads=1,
                           tie_word_embeddings=True)  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("pp") / "llama", "llama", num_hidden_layers=3)


def _reference(path: Path) -> tuple[list[Any], list[Any]]:
    llm = LLM(**_engine_kwargs(path))
    try:
        return _run(llm, GREEDY), _run(llm, SEEDED)
    finally:
        llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def tp_llm(qwen2: Path) -> Iterator[LLM]:
    # Async scheduling, as on a GPU: each rank launches step N+1 before it answers step N.
    llm = LLM(**_engine_kwargs(qwen2), tensor_parallel_size=2, async_scheduling=True)
    yield llm
    llm.llm_engine.shutdown()


def _assert_same(got: list[Any], want: list[Any]) -> None:
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want, strict=True):
        for g_pos, w_pos in zip(g.logprobs or [], w.logprobs or [], strict=True):
            assert g_pos.keys() == w_pos.keys()
            for token, lp in w_pos.items():
                assert abs(g_pos[token].logprob - lp.logprob) < 1e-4


def test_tensor_parallel_matches_one_device(tp_llm: LLM, qwen2: Path) -> None:
    greedy, seeded = _reference(qwen2)
    _assert_same(_run(tp_llm, GREEDY), greedy)
    # Seeded sampling draws its noise from (seed, position): every rank samples the same token.
    assert [o.token_ids for o in _run(tp_llm, SEEDED)] == [o.token_ids for o in seeded]
    engine = tp_llm.llm_engine
    assert engine.runner is None and engine.config.distributed_executor_backend == "mp"
    assert engine.executor.world_size == 2 and engine.async_scheduling
    # Steps overlap: a step's samples come back while the next one is on the ranks, and the last step
    # of a batch (nothing sent after it) is answered too.
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"o{i}", prompt, GREEDY)
    final: dict[str, list[int]] = {}
    overlapped = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        overlapped += bool(outputs) and engine.num_steps_in_flight == 1
        final.update((o.request_id, list(o.outputs[0].token_ids)) for o in outputs if o.finished)
    assert overlapped >= 10, f"a step finished while the next one ran only {overlapped} times"
    assert final == {f"o{i}": list(o.token_ids) for i, o in enumerate(greedy)}
    assert engine.num_steps_in_flight == 0


def test_every_rank_profiles_itself(tp_llm: LLM, tmp_path: Path) -> None:
    tp_llm.start_profile()
    tp_llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    summaries = tp_llm.stop_profile(str(tmp_path))
    assert [s.rank for s in summaries] == [0, 1]
    # Each rank ran the all-reduces of its row-parallel layers (gloo on the CPU).
    assert all(s.share("allreduce", "all_reduce") > 0 for s in summaries), [s.kernels[:5] for s in summaries]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank1.json"]


def test_pipeline_parallel_matches_one_device_then_a_killed_worker_fails_loudly(llama: Path) -> None:
    greedy, _ = _reference(llama)
    llm = LLM(**_engine_kwargs(llama), pipeline_parallel_size=2)  # 3 layers: 2 + 1
    try:
        _assert_same(_run(llm, GREEDY), greedy)
        engine = llm.llm_engine
        # Two batches in flight, each stage holding one: requests arriving while a step runs make the next
        # step, and requests that arrived together split into two groups that alternate.
        for arrive_together in (False, True):
            arrivals = [(f"p{i}", prompt) for i, prompt in enumerate(PROMPTS)]
            final: dict[str, list[int]] = {}
            overlapped = 0
            while arrivals or engine.has_unfinished_requests():
                while arrivals:
                    engine.add_request(*arrivals.pop(0), GREEDY)
                    if not arrive_together:
                        break
                outputs = engine.step()
                overlapped += bool(outputs) and engine.num_steps_in_flight == 1
                final.update((o.request_id, list(o.outputs[0].token_ids)) for o in outputs if o.finished)
            assert overlapped >= 10, f"a step finished while the next one ran only {overlapped} times"
            assert final == {f"p{i}": list(o.token_ids) for i, o in enumerate(greedy)}
        engine.add_request("long", "Hello", SamplingParams(max_tokens=400, ignore_eos=True))
        for _ in range(3):
            engine.step()
        pids = engine.executor.pids
        os.kill(pids[0], signal.SIGKILL)  # the first stage: the last one is blocked receiving from it
        start = time.monotonic()
        with pytest.raises(ExecutorError, match=r"worker rank 0 \(pid \d+\) died with exit code -9"):
            for _ in range(1000):
                engine.step()
        assert time.monotonic() - start < 5
        with pytest.raises(ExecutorError):  # and every later call says so at once
            engine.check_health()
    finally:
        llm.llm_engine.shutdown()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "a worker outlived its engine"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split()[2] != "Z"
