"""Sample and prompt logprobs equal log_softmax of HF transformers' logits (tiny random float32 model).

kvik reports vLLM's default "raw" logprobs: the model's distribution before
any processor, penalty, temperature or filter, so even sampled requests with
every knob on must match HF's plain log_softmax at each position.
"""

from __future__ import annotations

import pytest
import torch
from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch="llama")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return path, hf


@pytest.fixture(scope="module")
def llm(model) -> LLM:
    return _llm(model[0])


def _llm(path, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="float32", num_kv_blocks=128, block_size=16, max_num_seqs=8)
    options.update(kwargs)
    return LLM(str(path), **options)


def hf_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: row j is log P(token j+1 | tokens[:j+1])."""
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, -1)


def check_position(entry, expected_row: torch.Tensor, chosen: int, k: int) -> None:
    assert next(iter(entry)) == chosen  # the chosen token comes first
    assert entry[chosen].logprob == pytest.approx(expected_row[chosen].item(), abs=1e-4)
    assert entry[chosen].rank == int((expected_row > expected_row[chosen]).sum()) + 1
    top = expected_row.topk(k)
    others = {t: lp for t, lp in entry.items() if t != chosen}
    expected_top = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    # The top k are all listed (the chosen one may be among them), with ranks 1..k.
    assert set(expected_top) - {chosen} == set(others)
    for rank, token in enumerate(top.indices.tolist(), start=1):
        assert entry[token].logprob == pytest.approx(expected_top[token], abs=1e-4)
        assert entry[token].rank == rank
        assert entry[token].decoded_token is not None


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=0.0),
        dict(temperature=1.5, top_k=5, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5, seed=3),
    ],
    ids=["greedy", "sampled-with-processors"],
)
def test_logprobs_match_hf_log_softmax(model, llm, knobs) -> None:
    _, hf = model
    prompts = random_prompts(3, seed=11, low=5, high=30)
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2, **knobs)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        completion = out.outputs[0]
        expected = hf_logprobs(hf, prompt + completion.token_ids)
        assert len(completion.logprobs) == len(completion.token_ids) == 8
        for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
            check_position(entry, expected[len(prompt) + i - 1], token, 3)
        total = sum(entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs, strict=True))
        assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for j in range(1, len(prompt)):
            check_position(out.prompt_logprobs[j], expected[j - 1], prompt[j], 2)


def test_prompt_logprobs_survive_chunked_prefill(model, llm) -> None:
    path, hf = model
    prompt = random_prompts(1, seed=12, low=50, high=51)[0]
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    whole = llm.generate([prompt], params)[0]
    chunked = _llm(path, max_num_batched_tokens=16, enable_chunked_prefill=True).generate([prompt], params)[0]
    expected = hf_logprobs(hf, prompt)
    assert len(chunked.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        check_position(chunked.prompt_logprobs[j], expected[j - 1], prompt[j], 1)
        assert chunked.prompt_logprobs[j][prompt[j]].logprob == pytest.approx(
            whole.prompt_logprobs[j][prompt[j]].logprob, abs=1e-5
        )


def test_requests_without_logprobs_get_none(llm) -> None:
    prompts = random_prompts(2, seed=13)
    outs = llm.generate(
        prompts, [SamplingParams(max_tokens=3, logprobs=0), SamplingParams(max_tokens=3, temperature=0)]
    )
    with_lp, without = outs[0].outputs[0], outs[1].outputs[0]
    assert [list(e) for e in with_lp.logprobs] == [[t] for t in with_lp.token_ids]  # k=0: just the chosen one
    assert without.logprobs is None and without.cumulative_logprob is None and outs[1].prompt_logprobs is None


def test_logprobs_above_the_cap_are_refused(llm) -> None:
    with pytest.raises(ValueError, match="logprobs=21 is above the maximum of 20"):
        llm.generate([[1, 2, 3]], SamplingParams(logprobs=21))


def test_stable_ties_order_equal_logprobs_by_token_id() -> None:
    """Deterministic mode: tied logprobs come in token-id order, whatever else the batch holds."""
    import torch
    from kvik.sample.logprobs import gather_logprobs

    row = torch.tensor([-3.0, -1.0, -2.0, -1.0, -1.0, -5.0, -2.0])
    batch = torch.stack([torch.randn(7), row, torch.randn(7)])
    for lp, r in ((row[None], 0), (batch, 1)):
        ids, lps, ranks = gather_logprobs(lp, torch.zeros(lp.shape[0], dtype=torch.int64), 4, stable_ties=True)
        assert ids[r, 1:].tolist() == [1, 3, 4, 2] and lps[r, 1:].tolist() == [-1.0, -1.0, -1.0, -2.0]
        assert ids[r, 0] == 0 and ranks[r] == 6
