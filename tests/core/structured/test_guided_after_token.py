"""``SamplingParams.guided_after_token_id``: the grammar starts only after a given token (a reasoning
model's ``</think>``), so the model samples freely until then and is constrained after it."""

from __future__ import annotations

import re

import pytest
from kvik import LLM, SamplingParams

pytest.importorskip("xgrammar")
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    path = tiny_model_dir(arch="llama")
    return LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=128, block_size=16, max_num_seqs=8)


def test_free_until_the_token_then_constrained(llm: LLM) -> None:
    free = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    start = free.token_ids[3]  # a token the model writes on its own
    first = free.token_ids.index(start)
    pattern = r"(yes|no)!"
    params = SamplingParams(max_tokens=40, temperature=0, guided_regex=pattern, guided_after_token_id=start,
                            ignore_eos=True)  # fmt: skip
    out = llm.generate([PROMPT], params)[0].outputs[0]
    assert out.token_ids[: first + 1] == free.token_ids[: first + 1]  # unconstrained up to the start token
    tail = llm.get_tokenizer().decode(out.token_ids[first + 1 :], skip_special_tokens=True)
    assert re.fullmatch(pattern, tail), tail
    assert out.finish_reason == "stop"  # the grammar ended it (ignore_eos: nothing else would)


def test_without_the_token_the_output_is_free(llm: LLM) -> None:
    free = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    never = next(t for t in range(3, 500) if t not in free.token_ids)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, guided_regex="z", guided_after_token_id=never)
    out = llm.generate([PROMPT], params)[0].outputs[0]
    assert out.token_ids == free.token_ids and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("value", "regex", "message"),
    [(-1, "a", "a token id >= 0"), (True, "a", "a token id >= 0"), (5, None, "unless a structured-output")],
)
def test_bad_values(value: object, regex: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(guided_after_token_id=value, guided_regex=regex)  # type: ignore[arg-type]
