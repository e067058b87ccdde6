"""A host proposer under async scheduling: steps that draft run synchronously, the others overlap.

Steps where no request got drafts start a back-off (async steps without proposing, doubling up to
``MAX_SKIPPED_STEPS``); a full batch (``disable_by_batch_size``) runs async as well. Greedy outputs
must equal the engine without speculation either way.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from kvik import LLM, SamplingParams
from kvik.spec_decode.backoff import MAX_SKIPPED_STEPS, SpecBackoff
from kvik.testing.reference import random_prompts

OPTIONS = dict(device="cpu", dtype="float32", block_size=16, max_model_len=128, max_num_seqs=8, num_kv_blocks=64)


def test_backoff_doubles_while_nothing_is_drafted_and_resets_on_drafts() -> None:
    backoff = SpecBackoff()
    skipped = []
    for drafted in [0, 0, 0, 0, 0, 0, 1, 0]:
        backoff.record(drafted)
        n = 0
        while backoff.skip():
            n += 1
        skipped.append(n)
    assert skipped == [1, 2, 4, 8, MAX_SKIPPED_STEPS, MAX_SKIPPED_STEPS, 0, 1]
    assert not backoff.skip()


def _launches(llm: LLM) -> list[int]:
    """Record, for every step launched, how many steps were still in flight (>0: it overlapped one)."""
    engine = llm.llm_engine
    seen: list[int] = []
    execute = engine.executor.execute_async

    def spy(scheduler_output: Any) -> Any:
        seen.append(engine.num_steps_in_flight)
        return execute(scheduler_output)

    engine.executor.execute_async = spy  # type: ignore[method-assign]
    return seen


def _run(target: str, spec: dict[str, Any] | None, prompts: list[Any], params: SamplingParams) -> tuple[list, LLM]:
    llm = LLM(target, async_scheduling=True, speculative_config=spec, **OPTIONS)
    return llm.generate(prompts, params, use_tqdm=False), llm


def test_steps_without_drafts_back_off_and_run_asynchronously(tiny_model_dir, replay_manager) -> None:
    target = str(tiny_model_dir("llama"))
    prompt = random_prompts(1, seed=3, low=8, high=24)[0]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    want, _ = _run(target, None, [{"prompt_token_ids": prompt}], params)
    replay_manager.CONTINUATIONS[tuple(prompt)] = list(want[0].outputs[0].token_ids)
    replay_manager.DRAFT_BELOW[0] = 12
    replay_manager.ASKED.clear()
    llm = LLM(target, async_scheduling=True, speculative_config={"method": "scripted", "num_speculative_tokens": 3},
              **OPTIONS)  # fmt: skip
    assert llm.llm_engine.async_scheduling  # a host proposer leaves async scheduling on
    launches = _launches(llm)
    got = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert got[0].metrics.num_accepted_tokens == got[0].metrics.num_draft_tokens >= 9  # drafting worked
    # Past position 12 nothing is drafted: the proposer is asked after 1, 2, 4, 8, 16, 16 skipped steps.
    late = [p for p in replay_manager.ASKED if p >= 12]
    gaps = [b - a for a, b in pairwise(late)]
    assert gaps == [2, 3, 5, 9, 17, 17][: len(gaps)] and len(gaps) >= 4, replay_manager.ASKED
    assert sum(launches) > 0, "no step overlapped another"  # the skipped steps ran asynchronously


def test_a_full_batch_runs_asynchronously(tiny_model_dir) -> None:
    target = str(tiny_model_dir("llama"))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=5, low=8, high=24)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want, _ = _run(target, None, prompts, params)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "disable_by_batch_size": 2}
    llm = LLM(target, async_scheduling=True, speculative_config=spec, **OPTIONS)
    launches = _launches(llm)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert llm.llm_engine.get_stats().spec_disabled_steps > 0
    assert any(launches)
    assert sum(o.metrics.num_draft_tokens for o in got) == 0  # the three ran together to the end


def test_a_draft_model_still_turns_async_scheduling_off(tiny_model_dir) -> None:
    target = str(tiny_model_dir("llama"))
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 2}
    llm = LLM(target, async_scheduling=True, speculative_config=spec, **OPTIONS)
    assert not llm.llm_engine.async_scheduling
