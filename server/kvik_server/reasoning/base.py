"""The reasoning-parser contract: split output into thinking and answer, settled prefixes only.

Like tool parsers (:mod:`kvik_server.tool_parsers.base`), ``split(text, final)`` must be
prefix-monotone: for a prefix ``p`` of ``t``, the reasoning and the answer of ``split(p,
False)`` are prefixes of those of ``split(t, False)`` and ``split(t, True)``. Streaming is
then the difference between successive splits and always adds up to the non-streamed one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(slots=True)
class ReasoningSplit:
    reasoning: str
    content: str  # the answer after the reasoning (tool calls are parsed from this)
    ended: bool  # the reasoning is over (what follows is answer)


class ReasoningParser(ABC):
    name: ClassVar[str]
    end_marker: ClassVar[str]
    start_marker: ClassVar[str | None] = None
    # True when output may start inside the reasoning (the prompt opened it): a grammar can then
    # wait for end_marker (SamplingParams.guided_after_token_id) and the model still thinks first.
    starts_in_reasoning: ClassVar[bool] = False

    @abstractmethod
    def split(self, text: str, final: bool) -> ReasoningSplit:
        """Reasoning and answer settled in ``text``; with ``final`` the text is the whole output."""

    def count_reasoning_tokens(self, token_ids: Sequence[int], tokenizer: Any, split: ReasoningSplit) -> int:
        """How many of the output tokens were reasoning (``usage.completion_tokens_details.reasoning_tokens``).

        Exact when the end marker is one vocabulary token (Qwen3, DeepSeek-R1): the tokens up to
        and including it. Otherwise the reasoning text re-encoded, an estimate.
        """
        if not split.reasoning:
            return 0
        if not split.ended:
            return len(token_ids)
        end_id = single_token_id(tokenizer, self.end_marker)
        if end_id is not None and end_id in token_ids:
            return list(token_ids).index(end_id) + 1
        return len(tokenizer.encode(split.reasoning, add_special_tokens=False))


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when it is one vocabulary token, else None."""
    try:
        token_id = tokenizer.convert_tokens_to_ids(text)
    except Exception:  # tokenizers without a token→id table
        return None
    if not isinstance(token_id, int) or token_id == getattr(tokenizer, "unk_token_id", None):
        return None
    return token_id
