"""Logits processors and filters against HF transformers' LogitsProcessors on the same logits.

Each kvik processor runs over a whole mixed batch (rows with different knobs);
the reference runs HF's processor one row at a time with that row's setting.
Presence/frequency penalties follow OpenAI's definition, computed by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as hf
from kvik.sample import logits_processors as lp
from kvik.sample.sampler import Sampler, SamplingBatch, apply_min_p, apply_top_k_top_p
from kvik.sampling_params import SamplingParams

VOCAB = 64


def column(values, like, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)[:, None]


def make_batch(params, outputs, prompts=None, eos=frozenset()) -> SamplingBatch:
    return SamplingBatch(
        params=params,
        output_positions=[len(o) for o in outputs],
        prompt_token_ids=prompts or [[] for _ in params],
        output_token_ids=outputs,
        eos_token_ids=eos,
    )


def random_history(rows: int, seed: int, low: int = 0, high: int = 20) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    # Few distinct tokens so repeats (counts > 1) occur.
    return [gen.integers(0, VOCAB // 4, gen.integers(low, high)).tolist() for _ in range(rows)]


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 3


def hf_row(processor, history: list[int], row: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([history], dtype=torch.long) if history else torch.zeros((1, 0), dtype=torch.long)
    return processor(ids, row[None].clone())[0]


def test_repetition_penalty_matches_hf() -> None:
    penalties = [1.0, 1.3, 0.7, 2.0, 1.1]
    prompts, outputs = random_history(5, 1), random_history(5, 2)
    logits = logits_for(5)
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    got = lp.apply_penalties(logits.clone(), make_batch(params, outputs, prompts))
    for i, penalty in enumerate(penalties):
        ref = hf_row(hf.RepetitionPenaltyLogitsProcessor(penalty), prompts[i] + outputs[i], logits[i])
        torch.testing.assert_close(got[i], ref)


def test_frequency_and_presence_penalties_follow_openai() -> None:
    settings = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.5), (-1.0, 0.7), (2.0, -2.0)]
    outputs = random_history(5, 3, low=5)
    prompts = random_history(5, 4)  # must not count: OpenAI's penalties look at generated tokens only
    logits = logits_for(5, 1)
    params = [SamplingParams(frequency_penalty=f, presence_penalty=p) for f, p in settings]
    got = lp.apply_penalties(logits.clone(), make_batch(params, outputs, prompts))
    for i, (frequency, presence) in enumerate(settings):
        expected = logits[i].clone()
        for token in set(outputs[i]):
            # mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
            expected[token] -= outputs[i].count(token) * frequency + presence
        torch.testing.assert_close(got[i], expected)


def test_all_penalties_compose_in_vllm_order() -> None:
    prompts, outputs = random_history(3, 5), random_history(3, 6, low=3)
    logits = logits_for(3, 2)
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)] * 3
    got = lp.apply_penalties(logits.clone(), make_batch(params, outputs, prompts))
    for i in range(3):
        ref = hf_row(hf.RepetitionPenaltyLogitsProcessor(1.5), prompts[i] + outputs[i], logits[i])
        for token in set(outputs[i]):
            ref[token] -= outputs[i].count(token) * 0.3 + 0.2
        torch.testing.assert_close(got[i], ref)


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.1), (10, 0.6, 0.05)])
@pytest.mark.parametrize("candidates", [0, 16])
def test_top_k_top_p_min_p_match_hf_warpers(top_k, top_p, min_p, candidates) -> None:
    logits = logits_for(6, 3)
    params = [SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)] * 3 + [SamplingParams()] * 3
    batch = make_batch(params, [[]] * 6)
    got = apply_min_p(apply_top_k_top_p(logits.clone(), batch, column, candidates), batch, column)
    warpers = []
    if top_k:
        warpers.append(hf.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(hf.TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(hf.MinPLogitsWarper(min_p))
    for i in range(6):
        ref = logits[i]
        for warper in warpers if i < 3 else []:
            ref = hf_row(warper, [], ref)
        torch.testing.assert_close(got[i], ref)


def test_logit_bias_matches_hf_sequence_bias() -> None:
    biases = [{3: 5.0, 10: -100.0}, {}, {0: 2.5, 63: -7.0, 7: 100.0}]
    logits = logits_for(3, 4)
    params = [SamplingParams(logit_bias=b or None) for b in biases]
    got = lp.apply_logit_bias(logits.clone(), make_batch(params, [[1, 2]] * 3))
    for i, bias in enumerate(biases):
        ref = logits[i]
        if bias:
            processor = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
            ref = hf_row(processor, [1, 2], ref)
        torch.testing.assert_close(got[i], ref)


def test_min_tokens_matches_hf_min_new_tokens() -> None:
    eos = frozenset({1, 2})
    cases = [(4, [5, 6], [9]), (4, [5, 6, 7, 8], [9]), (0, [], []), (3, [], [11, 12])]
    params = [SamplingParams(min_tokens=m, stop_token_ids=stops, max_tokens=10) for m, _, stops in cases]
    params.append(SamplingParams(min_tokens=5, ignore_eos=True, stop_token_ids=[13], max_tokens=10))
    outputs = [out for _, out, _ in cases] + [[4]]
    prompt = [20, 21, 22]
    logits = logits_for(len(params), 5)
    got = lp.apply_min_tokens(logits.clone(), make_batch(params, outputs, [prompt] * len(params), eos))
    for i, p in enumerate(params):
        stops = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else eos))
        processor = hf.MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, stops)
        torch.testing.assert_close(got[i], hf_row(processor, prompt + outputs[i], logits[i]))


def test_bad_words_match_hf_no_bad_words() -> None:
    words = [[7], [3, 4], [5, 6, 8]]
    outputs = [[1, 2, 3], [9, 5, 6], [3, 4, 5], [], [5, 6]]
    params = [SamplingParams(bad_words_token_ids=words)] * 4 + [SamplingParams()]
    logits = logits_for(5, 6)
    got = lp.apply_bad_words(logits.clone(), make_batch(params, outputs))
    processor = hf.NoBadWordsLogitsProcessor(words)
    for i in range(4):
        # vLLM (and kvik) match the prefix against generated tokens: give HF the output only.
        torch.testing.assert_close(got[i], hf_row(processor, outputs[i], logits[i]))
    torch.testing.assert_close(got[4], logits[4])


def test_allowed_token_ids_keep_only_those() -> None:
    params = [SamplingParams(allowed_token_ids=[1, 5, 9]), SamplingParams(), SamplingParams(allowed_token_ids=[0])]
    logits = logits_for(3, 7)
    got = lp.apply_allowed_token_ids(logits.clone(), make_batch(params, [[]] * 3))
    for i, p in enumerate(params):
        allowed = set(p.allowed_token_ids or range(VOCAB))
        for t in range(VOCAB):
            assert got[i, t] == (logits[i, t] if t in allowed else float("-inf"))


def test_token_bitmask_unpacks_xgrammar_layout() -> None:
    gen = np.random.default_rng(0)
    allowed = gen.random((2, VOCAB)) < 0.3
    words = np.zeros((2, (VOCAB + 31) // 32), dtype=np.int64)
    for t in range(VOCAB):
        words[:, t // 32] |= allowed[:, t].astype(np.int64) << (t % 32)
    bitmask = words.astype(np.uint32).view(np.int32)  # bit 31 is the sign bit, as in xgrammar's buffers
    logits = logits_for(3, 8)
    got = lp.apply_token_bitmask(logits.clone(), [0, 2], bitmask)
    expected = logits.clone()
    expected[0][~torch.from_numpy(allowed[0])] = float("-inf")
    expected[2][~torch.from_numpy(allowed[1])] = float("-inf")
    torch.testing.assert_close(got, expected)


def test_sampler_applies_processors_before_sampling() -> None:
    # Greedy rows show the processors ran: the argmax moves where the knobs say.
    logits = torch.zeros(4, VOCAB)
    logits[:, 10] = 5.0
    params = [
        SamplingParams(temperature=0, logit_bias={20: 10.0}),
        SamplingParams(temperature=0, allowed_token_ids=[30, 31]),
        SamplingParams(temperature=0, min_tokens=2, max_tokens=4),
        SamplingParams(temperature=0, bad_words_token_ids=[[10]]),
    ]
    logits[1, 31] = 1.0
    batch = make_batch(params, [[], [], [1], []], eos=frozenset({10}))
    # Rows 2 and 3 lose token 10 (EOS before min_tokens; a bad word): the first of the zeros wins.
    assert Sampler()(logits, batch).tolist() == [20, 31, 0, 0]
