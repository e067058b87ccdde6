"""Greedy speculative decoding gives token-identical outputs to the same engine without it.

Random-weight models rarely repeat a prompt n-gram, so besides n-gram itself the
verifier is driven by a replay proposer (a test plugin that drafts the known
greedy continuation with some drafts wrong): both verifier paths run on every
request. The mix has prefix caching (shared prompt prefixes), chunked prefill (a
small step budget), preemption (a tiny KV pool), n > 1, logprobs, stop strings
and max_tokens.
"""

from __future__ import annotations

import pytest
from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 4, "suffix_min_match": 1}
REPLAY = {"method": "replay", "num_speculative_tokens": 3}
OPTIONS = dict(device="cpu", dtype="float32", block_size=16, max_model_len=128, max_num_seqs=8,
               max_num_batched_tokens=48)  # fmt: skip


def _prompts() -> list[list[int]]:
    rand = random_prompts(5, seed=3, low=5, high=60)
    shared = rand[0][:40]
    return [*rand, [*shared, 7, 8, 9], [*shared, 10, 11], rand[1][:12] * 3]


def _summary(outputs) -> list[tuple]:
    return [(c.token_ids, c.finish_reason) for o in outputs for c in o.outputs]


def _params() -> list[SamplingParams]:
    params = [SamplingParams(max_tokens=m, temperature=0, logprobs=2 if i % 3 == 0 else None)
              for i, m in enumerate([30, 7, 25, 20, 30, 12, 24, 30])]  # fmt: skip
    params[4] = SamplingParams(max_tokens=16, temperature=0, n=2)
    return params


@pytest.fixture
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.mark.parametrize("num_kv_blocks", [64, 10])  # 10 blocks of 16: preemption
def test_greedy_outputs_identical_with_drafts(model, replay_manager, num_kv_blocks) -> None:
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    base = LLM(model, num_kv_blocks=num_kv_blocks, **OPTIONS)
    want = base.generate(prompts, _params(), use_tqdm=False)
    for p, o in zip(_prompts(), want, strict=True):
        replay_manager.CONTINUATIONS[tuple(p)] = o.outputs[0].token_ids
    for spec in (REPLAY, NGRAM, SUFFIX):
        llm = LLM(model, num_kv_blocks=num_kv_blocks, speculative_config=spec, **OPTIONS)
        got = llm.generate(prompts, _params(), use_tqdm=False)
        assert _summary(got) == _summary(want)
        for g, w in zip(got, want, strict=True):
            for gc, wc in zip(g.outputs, w.outputs, strict=True):
                if wc.logprobs is not None:  # same entries; values equal up to batch-composition rounding
                    assert [list(e) for e in gc.logprobs] == [list(e) for e in wc.logprobs]
                    for ge, we in zip(gc.logprobs, wc.logprobs, strict=True):
                        assert [ge[t].logprob for t in we] == pytest.approx([we[t].logprob for t in we], abs=1e-4)
        stats = llm.llm_engine.get_stats()
        drafts = sum(o.metrics.num_draft_tokens for o in got)
        accepted = sum(o.metrics.num_accepted_tokens for o in got)
        assert (stats.spec_draft_tokens, stats.spec_accepted_tokens) == (drafts, accepted)
        if spec is REPLAY:
            assert 0 < accepted < drafts  # both verifier paths ran
            assert stats.num_steps < base.llm_engine.get_stats().num_steps  # fewer steps for the same tokens
            if num_kv_blocks == 10:
                assert stats.num_preemptions > 0


def test_stop_strings_and_max_tokens_land_exactly(model, replay_manager) -> None:
    base = LLM(model, num_kv_blocks=64, **OPTIONS)
    prompts = _prompts()[:4]
    free = base.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=30, temperature=0),
                         use_tqdm=False)  # fmt: skip
    for p, o in zip(prompts, free, strict=True):
        replay_manager.CONTINUATIONS[tuple(p)] = o.outputs[0].token_ids
    spec = LLM(model, num_kv_blocks=64, speculative_config={**REPLAY, "num_speculative_tokens": 5}, **OPTIONS)
    checked = 0
    for prompt, out in zip(prompts, free, strict=True):
        text, request = out.outputs[0].text, {"prompt_token_ids": prompt}
        for stop in (text[8:11], text[-6:-3]):
            params = SamplingParams(max_tokens=30, temperature=0, stop=[stop])
            want = base.generate([request], params, use_tqdm=False)[0].outputs[0]
            got = spec.generate([request], params, use_tqdm=False)[0].outputs[0]
            assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
                want.token_ids, want.text, want.finish_reason, want.stop_reason)  # fmt: skip
            checked += stop != ""
        for m in (1, 2, 4, 13):
            got = spec.generate([request], SamplingParams(max_tokens=m, temperature=0), use_tqdm=False)[0].outputs[0]
            assert got.token_ids == out.outputs[0].token_ids[:m] and got.finish_reason == "length"
        stop_id = out.outputs[0].token_ids[9]  # a stop token inside an accepted run ends it there
        got = spec.generate([request], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]  # fmt: skip
        first = out.outputs[0].token_ids.index(stop_id)
        assert got.token_ids == out.outputs[0].token_ids[: first + 1] and got.stop_reason == stop_id
    assert checked >= 6
    assert spec.llm_engine.get_stats().spec_accepted_tokens > 0


def test_streaming_delta_carries_all_accepted_tokens(model, replay_manager) -> None:
    prompt = _prompts()[-1]
    base = LLM(model, num_kv_blocks=64, **OPTIONS)
    want = base.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=30, temperature=0), use_tqdm=False)
    replay_manager.CONTINUATIONS[tuple(prompt)] = want[0].outputs[0].token_ids
    engine = LLM(model, num_kv_blocks=64, speculative_config=REPLAY, **OPTIONS).llm_engine
    engine.add_request("r", prompt, SamplingParams(max_tokens=30, temperature=0))
    deltas: list[list[int]] = []
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():  # cumulative outputs: what a stream sends is the growth
            deltas.append(out.outputs[0].token_ids[len(tokens) :])
            tokens = list(out.outputs[0].token_ids)
    assert tokens == want[0].outputs[0].token_ids
    assert max(len(d) for d in deltas) > 1  # several accepted tokens in one delta
