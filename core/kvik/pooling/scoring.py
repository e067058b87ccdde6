"""Scores of (query, document) pairs: a cross-encoder's relevance, or an embedder's cosine similarity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvik.pooling.outputs import ScoringOutput, ScoringRequestOutput
from kvik.pooling.params import PoolingParams

if TYPE_CHECKING:
    from kvik.entrypoints.llm import LLM


def pair_up(data_1: str | Sequence[str], data_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one text against many, or texts zipped one to one."""
    left = [data_1] if isinstance(data_1, str) else list(data_1)
    right = [data_2] if isinstance(data_2, str) else list(data_2)
    if not left or not right:
        raise ValueError("scoring needs at least one text on each side")
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise ValueError(f"got {len(left)} and {len(right)} texts; give one text, or as many on each side")
    return list(zip(left, right, strict=True))


def pair_token_ids(tokenizer: Any, first: str, second: str) -> list[int]:
    """The tokenizer's text-pair encoding (what a cross-encoder was trained on)."""
    return list(tokenizer(text=first, text_pair=second)["input_ids"])


def relevance(probs: list[float]) -> float:
    """A classifier's score: the single label's sigmoid, or the probability of class 1 of two."""
    if len(probs) == 1:
        return probs[0]
    if len(probs) == 2:
        return probs[1]
    raise ValueError(f"scoring needs a model with 1 or 2 labels; this one has {len(probs)}")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / max(norm, 1e-12)


def score_pairs(
    llm: LLM,
    data_1: str | Sequence[str],
    data_2: str | Sequence[str],
    truncate_prompt_tokens: int | None,
    use_tqdm: bool,
) -> list[ScoringRequestOutput]:
    pairs = pair_up(data_1, data_2)
    engine = llm.llm_engine
    if engine.pooling_task == "classify" and engine.pooler_setup is not None:
        tokenizer = llm.get_tokenizer()
        prompts = [pair_token_ids(tokenizer, q, d) for q, d in pairs]
        params = PoolingParams(task="classify", truncate_prompt_tokens=truncate_prompt_tokens)
        outs = llm.encode(prompts, params, use_tqdm)  # type: ignore[arg-type]
        return [
            ScoringRequestOutput(o.request_id, ScoringOutput(relevance(o.outputs.data)), o.prompt_token_ids)
            for o in outs
        ]
    texts = sorted({t for pair in pairs for t in pair})
    params = PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens)
    vectors = {t: o.outputs.data for t, o in zip(texts, llm.encode(texts, params, use_tqdm), strict=True)}
    return [
        ScoringRequestOutput(f"score-{i}", ScoringOutput(cosine(vectors[q], vectors[d])), [])
        for i, (q, d) in enumerate(pairs)
    ]
