"""Request-admission checks of SamplingParams that need the model (vocabulary) or the tokenizer."""

from __future__ import annotations

from typing import Any

from kvik.sampling_params import SamplingParams

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs (OpenAI's top_logprobs cap is 20 too)


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """ValueError (naming the field, the ids and the vocabulary size) for token ids outside the vocabulary."""
    fields: list[tuple[str, list[int]]] = [
        ("logit_bias", list(params.logit_bias or {})),
        ("allowed_token_ids", list(params.allowed_token_ids or [])),
        ("stop_token_ids", list(params.stop_token_ids)),
    ]
    for name, ids in fields:
        bad = sorted({t for t in ids if not 0 <= t < vocab_size})
        if bad:
            raise ValueError(
                f"SamplingParams.{name} has token ids {bad[:5]} outside the model's vocabulary [0, {vocab_size}); "
                "use ids the tokenizer produces"
            )
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > MAX_LOGPROBS:
            raise ValueError(f"SamplingParams.{name}={value} is above the maximum of {MAX_LOGPROBS}; ask for fewer")


def tokenize_bad_words(words: list[str], tokenizer: Any) -> list[list[int]]:
    """Each bad word as token sequences: alone (text start) and after a space (mid-sentence).

    vLLM keeps the space variant only when it has as many tokens as the bare
    word; kvik keeps it whenever it differs, so "wit" also bans " wit" when a
    BPE merges the space into one token.
    """
    if tokenizer is None:
        raise ValueError("bad_words needs a tokenizer to turn words into tokens; this engine has none")
    out: list[list[int]] = []
    for word in words:
        bare = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        for ids in (bare, spaced):
            if ids and ids not in out:
                out.append(ids)
    return out


def prepare_params(params: SamplingParams, vocab_size: int, tokenizer: Any) -> SamplingParams:
    """Validate against the model and fill derived fields; returns ``params`` or an updated copy."""
    check_token_ids(params, vocab_size)
    if params.bad_words and params.bad_words_token_ids is None:
        words = tokenize_bad_words(params.bad_words, tokenizer)
        bad = sorted({t for w in words for t in w if not 0 <= t < vocab_size})
        if bad:
            raise ValueError(f"bad_words tokenize to ids {bad[:5]} outside the model's vocabulary [0, {vocab_size})")
        params = params.clone(bad_words_token_ids=words)
    return params
