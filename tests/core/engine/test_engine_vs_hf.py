"""End-to-end: kvik's engine against HF transformers, and against itself under every scheduling feature."""

from __future__ import annotations

import pytest
from kvik import LLM, SamplingParams
from kvik.testing.reference import hf_greedy, random_prompts

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

MODELS = {
    "llama-gqa-llama3-rope": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=24),
    "qwen2-bias-tied": dict(arch="qwen2", tie_word_embeddings=True),
}


def _llm(path, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="float32", num_kv_blocks=256, block_size=16, max_num_seqs=16)
    options.update(kwargs)
    return LLM(str(path), **options)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_greedy_matches_hf(tiny_model_dir, name):
    path = tiny_model_dir(**MODELS[name])
    prompts = random_prompts(8, seed=1)
    expected = hf_greedy(path, prompts, NEW_TOKENS)
    got = _tokens(_llm(path).generate(prompts, GREEDY))
    assert got == expected


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    path = tiny_model_dir(**MODELS["llama-gqa-llama3-rope"])
    # Shared prefixes make the prefix cache do real work.
    base = random_prompts(6, seed=2, low=20, high=70)
    prompts = base + [base[0] + p for p in random_prompts(4, seed=3, low=5, high=30)]
    baseline = _tokens(_llm(path, enable_prefix_caching=False, enable_chunked_prefill=False).generate(prompts, GREEDY))
    return path, prompts, baseline


@pytest.mark.parametrize(
    "options",
    [
        dict(enable_prefix_caching=True),
        dict(enable_prefix_caching=True, max_num_batched_tokens=24),  # many chunks per prompt
        dict(enable_prefix_caching=False, max_num_batched_tokens=17, max_num_seqs=3),
        dict(num_kv_blocks=14, max_model_len=160),  # so small that requests get preempted
    ],
    ids=["prefix-cache", "chunked-prefill", "chunked-no-cache", "preemption"],
)
def test_scheduling_features_do_not_change_outputs(reference, options):
    path, prompts, baseline = reference
    llm = _llm(path, **options)
    assert _tokens(llm.generate(prompts, GREEDY)) == baseline
    stats = llm.llm_engine.get_stats()
    if options.get("num_kv_blocks") == 14:
        assert stats.num_preemptions > 0
    if options.get("enable_prefix_caching"):
        assert stats.prefix_cache_hits > 0
    assert stats.kv_cache_usage == 0.0 or stats.num_running == 0


def test_staggered_arrivals_match(reference):
    path, prompts, baseline = reference
    llm = _llm(path, max_num_batched_tokens=32)
    engine = llm.llm_engine
    results: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        # A new request arrives every other step while others are decoding.
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert [results[str(i)] for i in range(len(prompts))] == baseline


def test_seeded_sampling_reproducible_regardless_of_batch(reference):
    path, prompts, _ = reference
    llm = _llm(path)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompts[0]], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True)
    batch = llm.generate([*prompts[1:5], prompts[0]], [others] * 4 + [params])
    assert batch[-1].outputs[0].token_ids == alone
    small = _llm(path, num_kv_blocks=14, max_model_len=160)  # with preemption too
    crowd = small.generate([*prompts[:6], prompts[0]], [others] * 6 + [params])
    assert crowd[-1].outputs[0].token_ids == alone


def test_stop_strings_and_outputs(reference):
    path, prompts, _baseline = reference
    llm = _llm(path)
    full = llm.generate([prompts[0]], GREEDY)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == NEW_TOKENS
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("generated text has no usable stop string")
    out = llm.generate(
        [prompts[0]], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, stop=[stop])
    )
    first = out[0].outputs[0]
    assert first.finish_reason == "stop" and first.stop_reason == stop
    assert first.text == text[: text.index(stop)]


def test_n_samples_and_input_order(reference):
    path, prompts, _baseline = reference
    llm = _llm(path)
    outs = llm.generate(prompts[:3], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == prompts[:3]
    for o in outs:
        assert [c.index for c in o.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 8 for c in o.outputs)


def test_a_model_whose_layers_all_slide_releases_blocks_and_matches_hf(tiny_model_dir, monkeypatch) -> None:
    """Every layer of this Mistral slides (window 12, blocks of 4): the scheduler releases the blocks the window
    has passed, and the greedy tokens stay transformers', with chunked prefill and prefix caching doing work."""
    from kvik.scheduling.kv_cache_manager import KVCacheManager

    released: list[int] = []
    release = KVCacheManager.release_leading_blocks

    def counting(self, request_id: str, num_blocks: int, group: int = 0) -> bool:
        done = release(self, request_id, num_blocks, group)
        released.append(int(done))
        return done

    monkeypatch.setattr(KVCacheManager, "release_leading_blocks", counting)
    path = tiny_model_dir(arch="mistral", sliding_window=12)
    base = random_prompts(4, seed=5, low=30, high=60)
    prompts = base + [base[0] + p for p in random_prompts(2, seed=6, low=5, high=20)]
    expected = hf_greedy(path, prompts, NEW_TOKENS)
    llm = _llm(path, block_size=4, max_num_batched_tokens=24)
    assert llm.llm_engine.scheduler.group_windows == (12,)
    assert _tokens(llm.generate(prompts, GREEDY)) == expected
    assert sum(released) > 0
    # A request holds at most the window's blocks and a step's ((12 + 24 - 3) // 4 + 3 = 11), so a pool of 11
    # blocks (44 usable tokens) serves sequences of up to 86 tokens, one at a time, preempting as they compete.
    small = _llm(path, block_size=4, max_num_batched_tokens=24, num_kv_blocks=12)
    assert small.llm_engine.memory_plan.kv_tokens < max(len(p) for p in prompts) + NEW_TOKENS
    assert _tokens(small.generate(prompts, GREEDY)) == expected
    assert small.llm_engine.scheduler.get_stats().num_preemptions > 0


GEMMA_GROUPED = {
    # Gemma 2: sliding and global layers alternate (two groups of two layers).
    "gemma2": dict(arch="gemma2", num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=8),
    # Gemma 3: five sliding layers to one global (layer 5 of 0..6): one global group of one layer, six
    # sliding groups, every group's layer in the one shared tensor.
    "gemma3": dict(arch="gemma3", num_hidden_layers=7, head_dim=32, query_pre_attn_scalar=32, sliding_window=8),
}


@pytest.mark.parametrize("name", list(GEMMA_GROUPED))
def test_mixed_window_layers_keep_tables_apart_and_match_hf(tiny_model_dir, name) -> None:
    """Gemma's sliding and global layers get block tables of their own (KV-cache groups sharing one pool and
    the layers' tensors): the sliding groups release what their 8-token window has passed while the global
    group keeps every block, and the greedy tokens stay transformers' with prefix caching and chunked prefill
    doing work, also in a pool too small for the requests at once (preemption)."""
    path = tiny_model_dir(**GEMMA_GROUPED[name])
    base = random_prompts(4, seed=11, low=30, high=60)
    prompts = base + [base[0] + p for p in random_prompts(2, seed=12, low=5, high=20)]
    expected = hf_greedy(path, prompts, NEW_TOKENS)
    llm = _llm(path, block_size=4, max_num_batched_tokens=16, max_model_len=128)
    engine = llm.llm_engine
    windows = engine.scheduler.group_windows
    assert windows[0] is None and set(windows[1:]) == {8} and len(windows) == (2 if name == "gemma2" else 7)
    runner = engine.runner
    groups = runner.kv_cache_groups()
    assert len({id(c) for c in runner.kv_caches}) == groups.num_tensors < len(runner.kv_caches)
    held: list[int] = []
    kv = engine.scheduler.kv_cache
    step = engine.step

    def step_and_count():
        out = step()
        held.append(max((sum(b.block_id != 0 for b in t) for t in kv.block_tables.values()), default=0))
        return out

    engine.step = step_and_count  # type: ignore[method-assign]
    assert _tokens(llm.generate(prompts, GREEDY)) == expected
    assert engine.get_stats().prefix_cache_hits > 0
    # A request of up to 95 tokens holds at most 24 global blocks plus, per sliding group, the window's and a
    # step's ((8 + 16 - 3) // 4 + 3 = 8): less than its whole length in every group.
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    per_group = -(-longest // 4)
    assert max(held) <= per_group + (len(windows) - 1) * 8 < per_group * len(windows)
    blocks = engine.memory_plan.blocks_per_request + 2  # room for one full-length request and little more
    small = _llm(path, block_size=4, max_num_batched_tokens=16, max_model_len=128, num_kv_blocks=blocks)
    assert _tokens(small.generate(prompts, GREEDY)) == expected
    assert small.llm_engine.scheduler.get_stats().num_preemptions > 0


def test_mixed_windows_stay_in_one_group_where_nothing_would_be_freed(tiny_model_dir) -> None:
    """With requests no longer than a window and a step, a sliding group would free nothing: the layers stay in
    one table, one tensor each (the split's idle pages would only cost memory)."""
    path = tiny_model_dir(**GEMMA_GROUPED["gemma2"])
    llm = _llm(path, block_size=4, max_model_len=64)  # steps of up to 64 tokens: nothing is ever released
    assert llm.llm_engine.scheduler.group_windows == (None,)
    assert len({id(c) for c in llm.llm_engine.runner.kv_caches}) == 4
