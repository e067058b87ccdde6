"""Per-request sampling options, named and validated as in vLLM."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class StructuredOutputsParams:
    """A structured-output constraint, spelled as vLLM >= 0.10 spells it; set exactly one of
    ``json`` (a JSON schema), ``regex``, ``choice``, ``grammar`` (EBNF/GBNF) or ``json_object``."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's backend tuning knobs: accepted at their "off" values, refused otherwise (not implemented yet).
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                     "whitespace_pattern", "structural_tag"):  # fmt: skip
            if getattr(self, name) not in (None, False):
                raise ValueError(f"StructuredOutputsParams.{name} is not supported yet; leave it unset")
        given = [k for k in _CONSTRAINTS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "StructuredOutputsParams needs exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(given) or 'none'}"
            )

    def as_guided(self) -> dict[str, Any]:
        """The same constraint as SamplingParams' internal ``guided_*`` fields."""
        return {f"guided_{k}": getattr(self, k) for k in _CONSTRAINTS if getattr(self, k) not in (None, False)}


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(slots=True)
class BeamSearchParams:
    """Options of :meth:`kvik.LLM.beam_search` (vLLM's names and defaults).

    Each step keeps the ``beam_width`` partial sequences with the highest
    cumulative log-probability; finished ones (ending in EOS) are ranked by
    ``cumulative_logprob / len(tokens) ** length_penalty``.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"BeamSearchParams.beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"BeamSearchParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature != 0.0:
            raise ValueError(
                f"BeamSearchParams.temperature must be 0 (kvik's beam search is deterministic), got {self.temperature!r}"
            )
        if not _is_number(self.length_penalty):
            raise ValueError(f"BeamSearchParams.length_penalty must be a number, got {self.length_penalty!r}")


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's continuation.

    ``temperature == 0`` means greedy. Every field is checked in
    ``__post_init__``; a bad value raises ``ValueError`` naming the field, the
    value seen and what is accepted.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    # "cumulative": an output every step (streaming), each holding everything so far; "delta": an output
    # every step holding only what is new since the last one (vLLM's RequestOutputKind.DELTA: cheaper to
    # stream, and to send from an engine process); "final_only": only the finished output (offline batch),
    # which lets the engine skip per-step work.
    output_kind: str = "cumulative"
    # vLLM V1 removed best_of; only best_of == n (a no-op) is accepted.
    best_of: int | None = None
    # Keep only the last k prompt tokens (-1: as many as fit in max_model_len); vLLM's left truncation.
    truncate_prompt_tokens: int | None = None
    # vLLM's per-request logits processors: fn(output_ids, logits) or fn(prompt_ids, output_ids, logits)
    # returning the logits row [vocab]. Called in Python once per row per step: slow, for experiments.
    logits_processors: list[Callable[..., Any]] | None = None
    # Free-form data for plugins and custom processors; kvik only carries it.
    extra_args: dict[str, Any] | None = None
    # Structured output as vLLM >= 0.10 spells it; the guided_* fields below are its deprecated aliases.
    structured_outputs: StructuredOutputsParams | None = None
    # Structured output (vLLM's older guided_* names): at most one may be set.
    guided_json: dict[str, Any] | str | None = None  # a JSON schema
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # EBNF (GBNF)
    guided_json_object: bool = False  # any JSON object (OpenAI response_format json_object)
    # The constraint starts once this token has been generated (a reasoning model's end-of-thinking
    # token, e.g. </think>): sampling is free until then, so the model may think first.
    guided_after_token_id: int | None = None
    # Filled by the engine at admission (tokenized bad_words); not for users.
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._merge_structured_outputs()
        self._validate()

    def _merge_structured_outputs(self) -> None:
        """Keep ``structured_outputs`` and the ``guided_*`` aliases in step (one constraint, two spellings)."""
        guided = {name: getattr(self, name) for name in GUIDED_FIELDS if getattr(self, name) not in (None, False)}
        so = self.structured_outputs
        if isinstance(so, dict):
            so = self.structured_outputs = StructuredOutputsParams(**so)
        if so is not None:
            if not isinstance(so, StructuredOutputsParams):
                raise ValueError(f"SamplingParams.structured_outputs must be a StructuredOutputsParams, got {so!r}")
            if guided and guided != so.as_guided():
                raise ValueError("set structured_outputs or the deprecated guided_* fields, not both")
            for name, value in so.as_guided().items():
                setattr(self, name, value)
        elif len(guided) == 1:
            warnings.warn(
                f"SamplingParams.{next(iter(guided))} is deprecated (as in vLLM >= 0.10); use "
                "structured_outputs=StructuredOutputsParams(...)",
                DeprecationWarning,
                stacklevel=4,
            )
            self.structured_outputs = StructuredOutputsParams(**{k.removeprefix("guided_"): v for k, v in guided.items()})

    def _validate(self) -> None:
        def bad(name: str, value: Any, expected: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {expected}, got {value!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", self.n, "an integer >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1 (or None for up to max_model_len)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "a number >= 0 (0 means greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 1, or 0 / -1 to disable")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, value, "in [-2, 2]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "a number > 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", self.seed, "an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad(name, value, "an integer >= 0 or None")
        if self.output_kind not in ("cumulative", "delta", "final_only"):
            raise bad("output_kind", self.output_kind, "'cumulative', 'delta' or 'final_only'")
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids or any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids)
        ):
            raise bad("allowed_token_ids", self.allowed_token_ids, "a non-empty list of token ids >= 0, or None")
        if self.logit_bias is not None:
            self._validate_logit_bias(bad)
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise bad("bad_words", self.bad_words, "a list of non-empty strings")
        if self.best_of is not None and self.best_of != self.n:
            raise bad("best_of", self.best_of, f"None or equal to n ({self.n}): best_of > n is not supported "
                      "(vLLM V1 dropped it too); ask for n samples and rank them by cumulative_logprob")  # fmt: skip
        self._validate_guided(bad)
        tpt = self.truncate_prompt_tokens
        if tpt is not None and (not isinstance(tpt, int) or isinstance(tpt, bool) or (tpt < 1 and tpt != -1)):
            raise bad("truncate_prompt_tokens", tpt, "an integer >= 1, -1 (keep what fits) or None")
        if self.logits_processors is not None and (
            not isinstance(self.logits_processors, (list, tuple)) or not all(callable(f) for f in self.logits_processors)
        ):
            raise bad("logits_processors", self.logits_processors, "a list of callables")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise bad("extra_args", self.extra_args, "a dict or None")

    def _validate_logit_bias(self, bad: Any) -> None:
        # JSON objects have string keys: coerce "50256" -> 50256 as vLLM does; clamp biases to [-100, 100].
        coerced: dict[int, float] = {}
        for key, value in dict(self.logit_bias or {}).items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise bad("logit_bias", self.logit_bias, "a {token_id: bias} mapping with integer token ids") from None
            if token < 0 or not _is_number(value) or value != value:
                raise bad("logit_bias", self.logit_bias, "a {token_id >= 0: bias number} mapping")
            coerced[token] = max(-100.0, min(100.0, float(value)))
        self.logit_bias = coerced

    def _validate_guided(self, bad: Any) -> None:
        set_ = [name for name in GUIDED_FIELDS if getattr(self, name) not in (None, False)]
        if len(set_) > 1:
            raise ValueError(f"at most one structured-output constraint may be set, got {', '.join(set_)}")
        if self.guided_json is not None and not isinstance(self.guided_json, (dict, str)):
            raise bad("guided_json", self.guided_json, "a JSON schema (dict or JSON string)")
        for name in ("guided_regex", "guided_grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise bad(name, value, "a non-empty string")
        choice = self.guided_choice
        if choice is not None and (not choice or any(not isinstance(c, str) or not c for c in choice)):
            raise bad("guided_choice", choice, "a non-empty list of non-empty strings")
        after = self.guided_after_token_id
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise bad("guided_after_token_id", after, "a token id >= 0 or None")
        if after is not None and not set_:
            raise bad("guided_after_token_id", after, "None unless a structured-output constraint is set")

    @property
    def guided(self) -> tuple[str, Any] | None:
        """The structured-output constraint as (kind, spec), kind one of json/regex/choice/grammar/json_object."""
        for name in GUIDED_FIELDS:
            value = getattr(self, name)
            if value not in (None, False):
                return name.removeprefix("guided_"), value
        return None

    @property
    def reads_output_history(self) -> bool:
        """True when sampling reads the previously sampled tokens on the host (penalties,
        bad words, a grammar): such a request's next step cannot be scheduled before
        its last token is back (no async scheduling while it runs)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or bool(self.bad_words or self.bad_words_token_ids)
            or self.guided is not None
            or bool(self.logits_processors)
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone(self, **changes: Any) -> SamplingParams:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_json_object")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
