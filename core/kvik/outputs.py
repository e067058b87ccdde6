"""What the engine returns, shaped like vLLM's so user code ports unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(slots=True)
class Logprob:
    """One candidate token's log-probability at one position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# position -> {token id: Logprob}
SampleLogprobs = list[dict[int, Logprob]]
# prompt position -> {token id: Logprob}; None for the first prompt token (nothing predicts it)
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    """One sampled continuation of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (``time.time()`` seconds) of a request's milestones."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    # Speculative decoding (summed over the n samples): draft tokens verified and accepted, and
    # per draft position i the steps that verified a draft there and that accepted it; all
    # zero / empty without speculation.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)]


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: all its completions so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def add(self, delta: RequestOutput) -> None:
        """Fold a later ``output_kind="delta"`` output of the same request into this one (vLLM's
        ``RequestOutput.add``): each completion's new text, tokens and logprobs appended, its finish and
        running totals taken from ``delta``. A stream that fell behind hands on one merged output."""
        by_index = {c.index: c for c in self.outputs}
        for new in delta.outputs:
            old = by_index.get(new.index)
            if old is None:
                self.outputs.append(new)
                by_index[new.index] = new
                continue
            old.text += new.text
            old.token_ids = old.token_ids + new.token_ids
            if new.logprobs is not None:
                old.logprobs = (old.logprobs or []) + new.logprobs
            old.cumulative_logprob = new.cumulative_logprob
            old.finish_reason, old.stop_reason = new.finish_reason, new.stop_reason
        if delta.prompt_logprobs:
            self.prompt_logprobs = (self.prompt_logprobs or []) + delta.prompt_logprobs
        self.finished = delta.finished
        self.metrics = delta.metrics
        self.num_cached_tokens = delta.num_cached_tokens


# The output processor builds these two positionally (kvik.engine.output_processor), for speed.
assert tuple(f.name for f in fields(CompletionOutput)) == (
    "index", "text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason", "stop_reason"
), "CompletionOutput's fields changed order: update OutputProcessor._make_output"
assert tuple(f.name for f in fields(RequestOutput))[:8] == (
    "request_id", "prompt", "prompt_token_ids", "outputs", "finished", "metrics", "prompt_logprobs",
    "num_cached_tokens",
), "RequestOutput's fields changed order: update OutputProcessor._make_output"
