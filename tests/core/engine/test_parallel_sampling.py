"""n > 1: children share the prompt's KV blocks and each sample is reproducible under its own seed."""

from __future__ import annotations

import pytest
from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts

BLOCK = 16


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir(arch="llama")


def _llm(path, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="float32", num_kv_blocks=128, block_size=BLOCK, max_num_seqs=8)
    options.update(kwargs)
    return LLM(str(path), **options)


def test_children_share_the_prompt_blocks(path) -> None:
    llm = _llm(path, enable_prefix_caching=True)
    engine = llm.llm_engine
    prompt = random_prompts(1, seed=21, low=3 * BLOCK + 5, high=3 * BLOCK + 6)[0]  # 3 full blocks + 5 tokens
    n = 4
    engine.add_request("r", prompt, SamplingParams(n=n, seed=5, max_tokens=6, ignore_eos=True))
    engine.step()  # all children are admitted in this step
    kv = engine.scheduler.kv_cache
    tables = [kv.get_blocks(f"r#{i}") for i in range(n)]
    full = len(prompt) // BLOCK
    for b in range(full):
        shared = tables[0][b]
        assert all(t[b] is shared for t in tables), f"block {b} is not shared by every child"
        assert shared.ref_cnt == n
    # The partial last block is each child's own: they write different tokens into it.
    assert len({id(t[full]) for t in tables}) == n
    assert all(t[full].ref_cnt == 1 for t in tables)
    while engine.has_unfinished_requests():
        engine.step()
    assert all(block.ref_cnt == 0 for block in tables[0][:full])  # freed (kept only as cached blocks)


def test_each_sample_reproduces_under_its_seed(path) -> None:
    prompt = random_prompts(1, seed=22, low=40, high=41)[0]
    knobs = dict(max_tokens=12, ignore_eos=True, temperature=1.0, top_p=0.95)
    shared = _llm(path, enable_prefix_caching=True)
    samples = shared.generate([prompt], SamplingParams(n=3, seed=100, **knobs))[0].outputs
    assert [c.index for c in samples] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in samples}) > 1  # different seeds, different samples
    # Child i uses seed + i: the same tokens as a lone request with that seed, on an engine without sharing.
    alone = _llm(path, enable_prefix_caching=False)
    for i, sample in enumerate(samples):
        single = alone.generate([prompt], SamplingParams(seed=100 + i, **knobs))[0].outputs[0]
        assert single.token_ids == sample.token_ids
    again = shared.generate([prompt], SamplingParams(n=3, seed=100, **knobs))[0].outputs
    assert [c.token_ids for c in again] == [c.token_ids for c in samples]


def test_best_of_above_n_is_refused() -> None:
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=2, best_of=4)
    assert SamplingParams(n=2, best_of=2).best_of == 2
