"""SamplingParams knobs through the whole engine: admission checks, bad_words, min_tokens, logit_bias."""

from __future__ import annotations

import pytest
from kvik import LLM, SamplingParams
from kvik.sample.admission import tokenize_bad_words
from kvik.testing.reference import random_prompts


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    path = tiny_model_dir(arch="llama")
    return LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=128, block_size=16, max_num_seqs=8)


@pytest.mark.parametrize(
    "knobs,field",
    [
        (dict(logit_bias={100000: 1.0}), "logit_bias"),
        (dict(allowed_token_ids=[1, 99999]), "allowed_token_ids"),
        (dict(stop_token_ids=[70000]), "stop_token_ids"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused(llm, knobs, field) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams.{field} has token ids .* outside the model's vocabulary"):
        llm.generate([[1, 2, 3]], SamplingParams(**knobs))


def test_bad_words_never_appear(llm) -> None:
    prompt = random_prompts(1, seed=31)[0]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompt], greedy)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    word = tokenizer.decode(first.token_ids[:1])
    banned = {ids[0] for ids in tokenize_bad_words([word], tokenizer) if len(ids) == 1}
    assert first.token_ids[0] in banned
    again = llm.generate([prompt], greedy.clone(bad_words=[word]))[0].outputs[0]
    assert not banned & set(again.token_ids)


def test_min_tokens_masks_eos_until_reached(llm) -> None:
    eos = sorted(llm.llm_engine.model_config.eos_token_ids)[0]
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=5, logit_bias={eos: 100.0})
    out = llm.generate([[1, 2, 3]], params)[0].outputs[0]
    # EOS is forced by the bias but masked for the first 5 tokens, then ends the request.
    assert eos not in out.token_ids[:5] and out.token_ids[5:] == [eos] and out.finish_reason == "stop"
    assert llm.generate([[1, 2, 3]], params.clone(min_tokens=0))[0].outputs[0].token_ids == [eos]
