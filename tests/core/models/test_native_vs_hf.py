"""Every native architecture beyond the Llama family: kvik's greedy tokens against HF transformers (float32, CPU).

Each case is a tiny random checkpoint that exercises the architecture's special
features; the batch mixes prompt lengths and shares prefixes so prefix caching
does real work, and each runs with prefix caching and chunked prefill on and off.
"""

from __future__ import annotations

from typing import Any

import pytest
from kvik import LLM, SamplingParams
from kvik.testing.reference import hf_greedy, random_prompts

NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

SHORT = [1.0, 1.1, 1.3, 1.7, 2.0, 3.0, 5.0, 8.0]  # rotary_dim // 2 = 8 (head 32, partial 0.5)
LONG = [2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 12.0, 16.0]

CASES: dict[str, dict[str, Any]] = {
    "qwen3-qk-norm": dict(arch="qwen3", head_dim=32),
    "qwen3-sliding-layers": dict(
        arch="qwen3", use_sliding_window=True, sliding_window=12, max_window_layers=1, num_hidden_layers=3
    ),
    "mixtral-4-experts-top2-window": dict(
        arch="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, sliding_window=16
    ),
    "qwen3-moe-dense-layer-no-renorm": dict(
        arch="qwen3_moe",
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        num_hidden_layers=3,
    ),
    "qwen3-moe-renorm": dict(
        arch="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
    ),
    "qwen2-moe-shared-expert": dict(
        arch="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
    ),
    # head_dim 32 != query_pre_attn_scalar 24: the attention scale is not head_dim ** -0.5.
    # Caps low enough that tanh bends the random scores and logits.
    "gemma2-softcap-windows": dict(
        arch="gemma2",
        num_hidden_layers=4,
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=10,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0,
        tie_word_embeddings=True,
    ),
    "gemma3-5to1-local-rope": dict(
        arch="gemma3",
        num_hidden_layers=7,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=8,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        },
    ),
    # max_model_len 128 <= original_max_position_embeddings: HF and kvik both use the short factors.
    "phi3-longrope-partial-window": dict(
        arch="phi3",
        hidden_size=128,
        partial_rotary_factor=0.5,
        sliding_window=20,
        original_max_position_embeddings=128,
        max_position_embeddings=512,
        rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
    ),
    "phi3-su-tied": dict(
        arch="phi3",
        tie_word_embeddings=True,
        max_position_embeddings=256,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0, 1.5, 2.0, 4.0] * 2,
            "long_factor": [3.0] * 8,
            "original_max_position_embeddings": 128,
        },
    ),
}

SCHEDULES = {
    "prefix-cache+chunked": dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=24),
    "plain": dict(enable_prefix_caching=False, enable_chunked_prefill=False),
}


def prompts() -> list[list[int]]:
    base = random_prompts(4, seed=7, low=3, high=40)
    return base + [base[1] + p for p in random_prompts(2, seed=8, low=4, high=20)]


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Any) -> Any:
    cache: dict[str, tuple[Any, list[list[int]]]] = {}

    def get(case: str) -> tuple[Any, list[list[int]]]:
        if case not in cache:
            path = tiny_model_dir(**CASES[case])
            cache[case] = (path, hf_greedy(path, prompts(), NEW_TOKENS))
        return cache[case]

    return get


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf(expected: Any, case: str, schedule: str) -> None:
    path, reference = expected(case)
    options = dict(device="cpu", dtype="float32", num_kv_blocks=128, block_size=4, max_num_seqs=8, max_model_len=128)
    options.update(SCHEDULES[schedule])
    llm = LLM(str(path), **options)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY)]
    assert got == reference
    if options["enable_prefix_caching"]:
        assert llm.llm_engine.get_stats().prefix_cache_hits > 0


def test_gemma2_prompt_logprobs_follow_soft_capped_logits(expected: Any) -> None:
    """Soft-capping the final logits does not change greedy tokens (tanh is monotonic); the logprobs show it."""
    import torch
    import transformers

    path, _ = expected("gemma2-softcap-windows")
    prompt = prompts()[4]  # long enough for the window to matter
    llm = LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=128)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert out.prompt_logprobs is not None
    got = torch.tensor([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    assert logits.abs().max() < 4.0  # the cap was applied on HF's side too
    want = torch.log_softmax(logits, dim=-1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["gemma2-softcap-windows", "mixtral-4-experts-top2-window", "qwen3-moe-renorm"])
def test_bfloat16_rounds_where_hf_does(expected: Any, case: str) -> None:
    """In bfloat16 kvik rounds where HF's eager code does (Gemma's capped logits in the model dtype, Mixtral's
    float32 routing weights vs Qwen's rounded ones): prompt logprobs agree far closer than bf16 vs float32."""
    import torch
    import transformers

    path, _ = expected(case)
    prompt = prompts()[4]
    llm = LLM(str(path), device="cpu", dtype="bfloat16", num_kv_blocks=64, block_size=4, max_model_len=128)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert out.prompt_logprobs is not None
    got = torch.tensor([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.bfloat16,
        experts_implementation="eager",  # HF's reference loop, not grouped_mm
    ).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    want = torch.log_softmax(logits, dim=-1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # bf16 vs float32 differ by ~3e-2 here
