"""Async scheduling (step n+1 launched before step n's update) gives exactly the synchronous outputs.

On the CPU nothing overlaps (torch runs in the calling thread), but the engine
and the torch runner take the same path as on a GPU: placeholders in the
scheduler, pending tokens gathered from the previous step's device samples,
outputs reported one step later.
"""

from __future__ import annotations

import pytest
from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts


def _llm(path, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="float32", num_kv_blocks=256, block_size=16, max_num_seqs=16)
    options.update(kwargs)
    return LLM(str(path), **options)


def _summary(outputs) -> list[tuple]:
    """Everything but logprob values, which differ in the last bits when batches are composed differently."""
    return [
        (
            c.token_ids,
            c.finish_reason,
            c.stop_reason,
            c.text,
            None if c.logprobs is None else [{t: lp.rank for t, lp in entry.items()} for entry in c.logprobs],
        )
        for o in outputs
        for c in o.outputs
    ]


def _logprob_values(outputs) -> list[float]:
    return [lp.logprob for o in outputs for c in o.outputs for entry in c.logprobs or [] for lp in entry.values()]


@pytest.fixture(scope="module")
def workload(tiny_model_dir):
    path = tiny_model_dir(arch="llama")
    base = random_prompts(6, seed=4, low=10, high=60)
    prompts = base + [base[0] + p for p in random_prompts(4, seed=5, low=5, high=30)]
    # A token the greedy outputs produce often: a stop token that ends requests at different steps.
    probe = _llm(path).generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    counts: dict[int, int] = {}
    for o in probe:
        for t in o.outputs[0].token_ids[2:]:
            counts[t] = counts.get(t, 0) + 1
    stop_token = max(counts, key=counts.__getitem__)
    params = [
        SamplingParams(
            temperature=0.0, max_tokens=5 + 3 * i, stop_token_ids=[stop_token], logprobs=2 if i % 3 else None
        )
        for i in range(len(prompts))
    ]
    params[1] = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True)
    params[2] = SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=12, ignore_eos=True)
    return path, prompts, params


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(max_num_batched_tokens=24),  # chunked prefill
        dict(num_kv_blocks=14, max_model_len=160),  # preemption with tokens in flight
        dict(max_num_seqs=3, enable_prefix_caching=False),
    ],
    ids=["default", "chunked-prefill", "preemption", "few-seqs-no-cache"],
)
def test_async_matches_sync(workload, options):
    path, prompts, params = workload
    sync = _llm(path, async_scheduling=False, **options)
    assert not sync.llm_engine.async_scheduling
    expected = sync.generate(prompts, params)
    overlapped = _llm(path, async_scheduling=True, **options)
    assert overlapped.llm_engine.async_scheduling
    got = overlapped.generate(prompts, params)
    assert _summary(got) == _summary(expected)
    assert _logprob_values(got) == pytest.approx(_logprob_values(expected), abs=1e-5)
    stats = overlapped.llm_engine.get_stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    if options.get("num_kv_blocks") == 14:
        assert stats.num_preemptions > 0


def test_history_reading_requests_run_synchronously_and_match(workload):
    path, prompts, params = workload
    mixed = list(params)
    mixed[3] = SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.3, presence_penalty=0.5)
    expected = _summary(_llm(path, async_scheduling=False).generate(prompts, mixed))
    assert _summary(_llm(path, async_scheduling=True).generate(prompts, mixed)) == expected


def test_stop_strings_with_a_step_in_flight(workload):
    path, prompts, _ = workload
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = _llm(path).generate([prompts[0]], greedy)[0].outputs[0].text
    stop = text[len(text) // 3 : len(text) // 3 + 2]
    if not stop.strip():
        pytest.skip("generated text has no usable stop string")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    expected = _summary(_llm(path, async_scheduling=False).generate(prompts[:4], params))
    assert _summary(_llm(path, async_scheduling=True).generate(prompts[:4], params)) == expected


def test_steps_overlap_and_outputs_arrive_one_step_later(workload):
    path, prompts, _ = workload
    engine = _llm(path, async_scheduling=True).llm_engine
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, output_kind="cumulative")
    engine.add_request("a", prompts[0], greedy)
    assert engine.step() == []  # the prefill is launched, its token not yet back
    assert engine._in_flight is not None
    first = engine.step()  # launches the first decode, reports the prefill's token
    assert [len(o.outputs[0].token_ids) for o in first] == [1]
    steps = 1
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        if outs and outs[0].finished:
            assert len(outs[0].outputs[0].token_ids) == 3
    # The last token's step is never followed by a wasted one: max_tokens is known ahead.
    assert steps == 3
    assert engine.get_stats().kv_cache_usage == 0.0


def test_abort_with_a_step_in_flight(workload):
    path, prompts, _ = workload
    engine = _llm(path, async_scheduling=True).llm_engine
    greedy = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", prompts[0], greedy)
    engine.add_request("b", prompts[1], greedy)
    for _ in range(3):
        engine.step()
    aborted = engine.abort_request("a")
    assert aborted and aborted[0].outputs[0].finish_reason == "abort"
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    assert set(finished) == {"b"} and len(finished["b"].token_ids) == 50
    assert engine.get_stats().kv_cache_usage == 0.0
