"""The MLX runner driven directly by hand-built SchedulerOutputs, against HF transformers."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")

from kvik.testing.reference import hf_greedy, random_prompts

from .helpers import make_runner, run_greedy

NEW = 10
MODELS = {
    "llama-llama3-rope": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=12),
    "qwen2-bias-tied": dict(arch="qwen2", tie_word_embeddings=True),
}


def _blocks(prompts: list[list[int]], new: int, block_size: int = 16) -> list[list[int]]:
    """Scattered, non-contiguous block ids (counting down from the top of the pool)."""
    tables, next_id = [], 63
    for p in prompts:
        n = -(-(len(p) + new) // block_size)
        tables.append([next_id - 2 * j for j in range(n)])
        next_id -= 2 * n + 1
    return tables


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [None, 7], ids=["whole-prefill", "chunked-prefill"])
def test_mixed_batch_greedy_matches_hf(tiny_model_dir, name, chunk):
    path = tiny_model_dir(**MODELS[name])
    prompts = random_prompts(4, seed=5, low=3, high=40)
    expected = hf_greedy(path, prompts, NEW)
    runner = make_runner(path)
    assert run_greedy(runner, prompts, _blocks(prompts, NEW), NEW, chunk=chunk) == expected


def test_sliding_window_is_applied(tiny_model_dir):
    """The same weights with and without the window disagree once prompts exceed it."""
    path = tiny_model_dir(**MODELS["mistral-sliding-window"])
    prompts = random_prompts(3, seed=6, low=30, high=40)
    windowed = run_greedy(make_runner(path), prompts, _blocks(prompts, NEW), NEW)
    full = make_runner(path)
    full.model_config.sliding_window = None
    full.model.model.layers[0].self_attn.backend.sliding_window = None
    assert run_greedy(full, prompts, _blocks(prompts, NEW), NEW) != windowed


def test_prefix_reused_from_cache(tiny_model_dir):
    """A request whose first blocks were written by an earlier one computes only its tail."""
    from kvik.sampling_params import SamplingParams
    from kvik.scheduling.output import ScheduledRequest, SchedulerOutput

    path = tiny_model_dir(**MODELS["llama-llama3-rope"])
    runner = make_runner(path)
    shared = random_prompts(1, seed=7, low=32, high=33)[0]  # exactly two full blocks
    tail = [11, 12, 13, 14, 15]
    greedy = SamplingParams(temperature=0.0)
    first = runner.execute(SchedulerOutput([ScheduledRequest("a", shared, 0, [4, 9], True, greedy, shared)], 32))
    assert first.sampled_token_ids["a"] == hf_greedy(path, [shared], 1)[0]
    prompt = shared + tail
    step = ScheduledRequest("b", tail, 32, [4, 9, 17], True, greedy, prompt)  # blocks 4, 9 hold the prefix
    assert runner.execute(SchedulerOutput([step], len(tail))).sampled_token_ids["b"] == hf_greedy(path, [prompt], 1)[0]


def test_weight_and_block_sizes(tiny_model_dir):
    path = tiny_model_dir(**MODELS["qwen2-bias-tied"])
    runner = make_runner(path)
    mc = runner.model_config
    assert runner.kv_block_bytes(16) == 2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim * 4
    n_params = sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(path).parameters()
    )
    assert runner.weight_bytes() == 4 * n_params
    assert runner.kv_caches[0].shape == (2, 64, 16, mc.num_kv_heads, mc.head_dim)


def test_logprobs_and_prompt_logprobs_match_hf(tiny_model_dir):
    import numpy as np
    import torch
    from kvik.sampling_params import SamplingParams
    from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(**MODELS["qwen2-bias-tied"])
    prompt = random_prompts(1, seed=8, low=20, high=21)[0]
    with torch.no_grad():
        hf_lp = torch.log_softmax(AutoModelForCausalLM.from_pretrained(path)(torch.tensor([prompt])).logits[0], -1)
    params = SamplingParams(temperature=0.0, logprobs=2, prompt_logprobs=1)
    runner = make_runner(path)
    # Two chunks: prompt logprobs come for the positions each step computes.
    first = runner.execute(SchedulerOutput([ScheduledRequest("r", prompt[:8], 0, [3, 5], False, params, prompt)], 8))
    second = runner.execute(SchedulerOutput([ScheduledRequest("r", prompt[8:], 8, [3, 5], True, params, prompt)], 12))
    entries = first.prompt_logprobs["r"] + second.prompt_logprobs["r"]
    assert len(entries) == len(prompt) - 1
    for pos, entry in enumerate(entries):
        target = prompt[pos + 1]
        assert next(iter(entry)) == target and len(entry) in (1, 2)  # the scored token first, then the top k
        np.testing.assert_allclose(entry[target], hf_lp[pos, target].item(), rtol=1e-4, atol=1e-4)
    (sample_entry,) = second.logprobs["r"]
    token = second.sampled_token_ids["r"][0]
    top2 = torch.topk(hf_lp[-1], 2).indices.tolist()
    assert token == top2[0] and list(sample_entry) == top2  # chosen first (it is also the top one)
    assert second.logprob_ranks["r"] == [1]
    np.testing.assert_allclose(sample_entry[token], hf_lp[-1, token].item(), rtol=1e-4, atol=1e-4)


def test_profile_measured_peak_is_within_the_estimate(tiny_model_dir):
    """The Metal path measures a real maximal step; the CPU build's shape-based estimate must cover it."""
    from kvik_apple.runner import estimate_activation_bytes

    path = tiny_model_dir(**MODELS["llama-llama3-rope"])
    runner = make_runner(path, max_num_batched_tokens=256, max_num_seqs=8, max_model_len=256)
    caches = runner.kv_caches
    measured = runner._measure_step_peak()
    assert runner.kv_caches is caches  # the scratch cache is dropped again
    estimate = estimate_activation_bytes(runner.model_config, runner.config, 4)
    assert 0 < measured <= estimate
    from kvik_apple.platform import metal_available

    if not metal_available():  # the CPU build plans with the estimate
        assert runner.profile() == estimate


def test_half_precision(tiny_model_dir):
    """float16 keeps the float32 tokens on this model; bfloat16 runs with a bfloat16 cache and weights."""
    import mlx.core as mx

    path = tiny_model_dir(**MODELS["mistral-sliding-window"])
    prompts = random_prompts(4, seed=9, low=5, high=30)
    tables = _blocks(prompts, NEW)
    reference = run_greedy(make_runner(path), prompts, tables, NEW)
    assert run_greedy(make_runner(path, dtype="float16"), prompts, tables, NEW) == reference
    bf16 = make_runner(path, dtype="bfloat16")
    assert bf16.kv_caches[0].dtype == mx.bfloat16
    assert bf16.model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    first = [out[0] for out in run_greedy(bf16, prompts, tables, 1)]
    assert sum(a == b[0] for a, b in zip(first, reference, strict=True)) >= 3  # rounding may flip a near-tie
