"""``disable_by_batch_size``: steps whose running batch reaches the limit propose no drafts.

Outputs stay identical, the disabled steps are counted, and speculation resumes once
the batch shrinks: with a draft model equal to the target, drafts after the resume
are still all accepted, so the draft KV was kept in step while nothing was drafted.
"""

from __future__ import annotations

from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts

OPTIONS = dict(device="cpu", dtype="float32", block_size=16, max_model_len=96, max_num_seqs=8, num_kv_blocks=48)


def test_speculation_pauses_under_load_and_resumes(tiny_model_dir) -> None:
    target = str(tiny_model_dir("llama"))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=11, low=6, high=30)]
    # Two requests end early: the last one runs alone, below the limit, for its last ~12 steps.
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (4, 6, 24)]
    want = LLM(target, **OPTIONS).generate(prompts, params, use_tqdm=False)
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 3, "disable_by_batch_size": 2}
    llm = LLM(target, speculative_config=spec, **OPTIONS)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    stats = llm.llm_engine.get_stats()
    assert stats.spec_method == "draft_model" and stats.spec_disabled_steps > 0
    assert [o.metrics.num_draft_tokens for o in got[:2]] == [0, 0]  # they only ran in a batch of >= 2
    assert got[2].metrics.num_draft_tokens > 6
    assert got[2].metrics.num_accepted_tokens == got[2].metrics.num_draft_tokens
