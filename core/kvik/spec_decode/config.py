"""``speculative_config``: vLLM's dictionary, checked once into a frozen dataclass."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

# Methods kvik ships; plugins add more through ``kvik_register_spec_proposers``.
BUILTIN_METHODS = ("ngram", "suffix", "draft_model", "eagle", "eagle3")
# Methods that run a model on the runner and need ``model`` (a checkpoint path or Hub id).
MODEL_METHODS = ("draft_model", "eagle", "eagle3")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """How draft tokens are proposed.

    ``prompt_lookup_*`` are the n-gram proposer's pattern lengths (the longest
    suffix of the sequence, between min and max tokens, that occurred earlier);
    ``suffix_*`` belong to the suffix proposer; ``model`` is the draft checkpoint
    of ``draft_model`` (and the head of ``eagle`` / ``eagle3``).
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    # Suffix decoding: the shortest match worth proposing from, and how many finished
    # requests' outputs the shared index remembers (0: only the request's own tokens).
    suffix_min_match: int = 2
    suffix_cache_requests: int = 64
    # draft_model / eagle / eagle3: the draft checkpoint (a local path or Hub id).
    model: str | None = None
    # Speculation is off for a step whose running batch has at least this many requests
    # (vLLM's disable_by_batch_size: large batches are compute-bound already). 0: never.
    disable_by_batch_size: int = 0

    def __post_init__(self) -> None:
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "suffix_min_match"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {value!r}")
        if self.num_speculative_tokens > 16:
            raise ValueError(
                f"speculative_config: num_speculative_tokens={self.num_speculative_tokens} is above kvik's limit of 16"
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config: prompt_lookup_min={self.prompt_lookup_min} is larger than "
                f"prompt_lookup_max={self.prompt_lookup_max}"
            )
        if (
            isinstance(self.suffix_cache_requests, bool)
            or not isinstance(self.suffix_cache_requests, int)
            or (self.suffix_cache_requests < 0)
        ):
            raise ValueError(
                f"speculative_config: suffix_cache_requests must be an integer >= 0, got {self.suffix_cache_requests!r}"
            )
        limit = self.disable_by_batch_size
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(
                f"speculative_config: disable_by_batch_size must be an integer >= 0 (0: never), got {limit!r}"
            )

        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"speculative_config: model must be a checkpoint path, got {self.model!r}")
        if self.method in MODEL_METHODS and self.model is None:
            raise ValueError(
                f"speculative_config: method {self.method!r} needs 'model', the draft checkpoint "
                f"(e.g. {{'method': {self.method!r}, 'model': '/path/to/draft', 'num_speculative_tokens': 4}})"
            )

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str) -> SpeculativeConfig:
        """From a dict (``LLM(speculative_config={...})``) or its JSON (``--speculative-config``)."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict (or its JSON), got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        for key in ("method", "num_speculative_tokens"):
            if key not in value:
                raise ValueError(
                    f"speculative_config needs {key!r} (e.g. {{'method': 'ngram', 'num_speculative_tokens': 4}})"
                )
        if not isinstance(value["method"], str):
            raise ValueError(f"speculative_config: method must be a string, got {value['method']!r}")
        return cls(**value)
