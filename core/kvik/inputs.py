"""Prompt shapes ``LLM.generate`` accepts, as vLLM spells them (``vllm.inputs.TextPrompt`` / ``TokensPrompt``).

A prompt is a string, a list of token ids, ``{"prompt": "..."}`` or
``{"prompt_token_ids": [...]}``. kvik serves text-only models: a prompt
carrying ``multi_modal_data`` is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict


class _Optional(TypedDict, total=False):
    multi_modal_data: Any  # refused: text-only models
    mm_processor_kwargs: Any
    cache_salt: str


class TextPrompt(_Optional):
    prompt: str


class TokensPrompt(_Optional):
    prompt_token_ids: list[int]


PromptType = str | Sequence[int] | TextPrompt | TokensPrompt
# What the engine takes: text, or token ids.
EnginePrompt = str | list[int]

_IGNORED_KEYS = ("cache_salt",)  # kvik's prefix cache is per process; a salt changes nothing observable


def parse_prompt(prompt: Any) -> EnginePrompt:
    """One prompt in any accepted shape → a string or a list of token ids (TypeError/ValueError if neither)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        return _parse_dict(prompt)
    if isinstance(prompt, Sequence):
        if set(map(type, prompt)) <= {int}:  # plain ints, checked in C: ~50x faster than a generator per token
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):  # int subclasses (IntEnum, ...)
            return [int(t) for t in prompt]
    raise TypeError(
        "a prompt must be a string, a list of token ids, {'prompt': str} or {'prompt_token_ids': [int, ...]}, "
        f"got {type(prompt).__name__}"
    )


def token_id_list(token_ids: Sequence[Any]) -> list[int]:
    """``[int(t) for t in token_ids]``; a sequence of plain ints (the usual case) is copied in C instead of
    calling ``int()`` per id (a batch of 4,096 texts of 512 ids: 2 M calls holding the GIL)."""
    if set(map(type, token_ids)) <= {int}:
        return list(token_ids)
    return [int(t) for t in token_ids]


def _parse_dict(prompt: dict[str, Any]) -> EnginePrompt:
    if prompt.get("multi_modal_data") or prompt.get("mm_processor_kwargs"):
        raise ValueError("multi_modal_data is not supported: kvik serves text-only models")
    keys = set(prompt) - {"multi_modal_data", "mm_processor_kwargs", *_IGNORED_KEYS}
    if keys == {"prompt"} and isinstance(prompt["prompt"], str):
        return str(prompt["prompt"])
    if "prompt_token_ids" in keys and keys <= {"prompt_token_ids", "prompt"}:
        # vLLM's TokensPrompt may also carry the text it came from; the ids win.
        return parse_prompt(list(prompt["prompt_token_ids"]))
    raise ValueError(
        "a prompt dict needs 'prompt' (a string) or 'prompt_token_ids' (a list of ints); "
        f"got keys {sorted(prompt)}"
    )


def parse_prompts(prompts: Any, prompt_token_ids: Any = None) -> list[EnginePrompt]:
    """A prompt or a list of prompts (and vLLM's older ``prompt_token_ids=`` keyword) → a list of engine prompts."""
    if prompt_token_ids is not None:
        if prompts is not None:
            raise ValueError("pass prompts or prompt_token_ids, not both")
        ids = list(prompt_token_ids)
        if ids and all(isinstance(t, int) for t in ids):
            return [parse_prompt(ids)]
        return [parse_prompt(list(p)) for p in ids]
    if prompts is None:
        raise ValueError("no prompts given")
    if isinstance(prompts, (str, dict)):
        return [parse_prompt(prompts)]
    items = list(prompts)
    if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [parse_prompt(items)]  # one list of token ids
    return [parse_prompt(p) for p in items]
