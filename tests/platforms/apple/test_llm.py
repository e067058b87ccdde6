"""End-to-end through kvik.LLM(device="apple"): against HF transformers and against kvik's torch CPU path."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")

from kvik import LLM, SamplingParams
from kvik.testing.reference import hf_greedy, random_prompts

from .test_runner import MODELS

NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def _llm(path, device: str = "apple", **kwargs) -> LLM:
    options = dict(device=device, dtype="float32", num_kv_blocks=128, block_size=16, max_num_seqs=16)
    options.update(kwargs)
    return LLM(str(path), **options)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _prompts() -> list[list[int]]:
    # Mixed lengths, and shared prefixes so the prefix cache does real work.
    base = random_prompts(5, seed=11, low=3, high=50)
    return base + [base[4] + p for p in random_prompts(3, seed=12, low=2, high=20)]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_hf_with_prefix_cache_and_chunked_prefill(tiny_model_dir, name):
    path = tiny_model_dir(**MODELS[name])
    prompts = _prompts()
    llm = _llm(path, enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=24)
    got = _tokens(llm.generate(prompts, GREEDY))
    assert got == hf_greedy(path, prompts, NEW)
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0


def test_same_tokens_as_the_torch_cpu_path(tiny_model_dir):
    path = tiny_model_dir(**MODELS["qwen2-bias-tied"])
    prompts = _prompts()
    cpu = _tokens(_llm(path, device="cpu").generate(prompts, GREEDY))
    assert _tokens(_llm(path).generate(prompts, GREEDY)) == cpu


def test_seeded_sampling_reproducible_across_batches(tiny_model_dir):
    path = tiny_model_dir(**MODELS["llama-llama3-rope"])
    llm = _llm(path)
    prompts = _prompts()
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=7, max_tokens=NEW, ignore_eos=True)
    alone = _tokens(llm.generate([prompts[0]], seeded))[0]
    others = SamplingParams(temperature=0.7, max_tokens=NEW, ignore_eos=True)
    batch = llm.generate(prompts, [seeded] + [others] * (len(prompts) - 1))
    assert batch[0].outputs[0].token_ids == alone
    greedy = _tokens(llm.generate([prompts[0]], GREEDY))[0]
    assert alone != greedy  # it really sampled


def test_chat_matches_hf_on_the_templated_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    path = tiny_model_dir(**MODELS["qwen2-bias-tied"])
    messages = [{"role": "user", "content": "Hello world! How are you today?"}]
    out = _llm(path).chat(messages, GREEDY)[0].outputs[0]
    ids = AutoTokenizer.from_pretrained(path).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert out.token_ids == hf_greedy(path, [list(ids)], NEW)[0]


def test_preemption_does_not_change_outputs(tiny_model_dir):
    path = tiny_model_dir(**MODELS["llama-llama3-rope"])
    prompts = _prompts()
    llm = _llm(path, num_kv_blocks=8, max_model_len=96, max_num_batched_tokens=32)
    assert _tokens(llm.generate(prompts, GREEDY)) == hf_greedy(path, prompts, NEW)
    assert llm.llm_engine.get_stats().num_preemptions > 0


def test_logprobs_match_the_torch_cpu_path(tiny_model_dir):
    path = tiny_model_dir(**MODELS["qwen2-bias-tied"])
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    prompt = _prompts()[0]
    cpu, apple = (_llm(path, device=d).generate([prompt], params)[0] for d in ("cpu", "apple"))

    def check(got, expected):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            if e is None:
                assert g is None
                continue
            assert [(t, lp.rank) for t, lp in g.items()] == [(t, lp.rank) for t, lp in e.items()]
            assert [lp.logprob for lp in g.values()] == pytest.approx([lp.logprob for lp in e.values()], abs=1e-4)

    assert apple.outputs[0].token_ids == cpu.outputs[0].token_ids
    check(apple.outputs[0].logprobs, cpu.outputs[0].logprobs)
    check(apple.prompt_logprobs, cpu.prompt_logprobs)
    assert len(apple.prompt_logprobs) == len(prompt) and apple.prompt_logprobs[0] is None


def test_structured_output_matches_the_torch_cpu_path(tiny_model_dir):
    pytest.importorskip("xgrammar", reason="structured output needs xgrammar")
    path = tiny_model_dir(**MODELS["qwen2-bias-tied"])
    params = SamplingParams(temperature=0.0, max_tokens=12, guided_choice=["hello world", "quick brown fox"])
    cpu, apple = (_llm(path, device=d).generate(["Tell me:"], params)[0].outputs[0] for d in ("cpu", "apple"))
    assert apple.text in ("hello world", "quick brown fox")
    assert apple.token_ids == cpu.token_ids


def test_per_request_logits_processors_match_the_torch_cpu_path(tiny_model_dir):
    import torch

    def no_repeats(output_ids, logits):  # vLLM's per-request form: ban every token already generated
        if output_ids:
            logits[torch.tensor(output_ids)] = float("-inf")
        return logits

    path = tiny_model_dir(**MODELS["qwen2-bias-tied"])
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logits_processors=[no_repeats])
    cpu, apple = (_llm(path, device=d).generate(["Tell me:"], params)[0].outputs[0] for d in ("cpu", "apple"))
    assert apple.token_ids == cpu.token_ids
    assert len(set(apple.token_ids)) == len(apple.token_ids) == 10
