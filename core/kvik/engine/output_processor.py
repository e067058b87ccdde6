"""Turns scheduler progress into user-facing RequestOutputs (text, stop strings, n samples)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvik.engine.detokenizer import IncrementalDetokenizer
from kvik.engine.logprobs_processor import LogprobsProcessor
from kvik.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvik.request import Request
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import RunnerOutput, SchedulerOutput


@dataclass(slots=True)
class SampleState:
    """One of a user request's ``n`` samples, backed by one scheduler Request."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_detokenized: int = 0  # output tokens already fed to the detokenizer
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # per output token (if asked)
    cumulative_logprob: float = 0.0
    # output_kind "delta": the tokens and characters of text already sent, and whether the finish was.
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    finish_sent: bool = False


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    metrics: RequestMetrics
    extra: dict[str, Any] = field(default_factory=dict)
    # Per prompt token (the first has none), filled as prefill chunks run.
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=lambda: [None])
    num_sent_prompt_logprobs: int = 0  # output_kind "delta": entries already sent

    @property
    def finished(self) -> bool:
        # A loop, not all(genexpr), which costs a generator: read for every streamed request every step.
        for sample in self.samples:  # noqa: SIM110
            if sample.finish_reason is None:
                return False
        return True


class OutputProcessor:
    """Owns detokenizers and output assembly; finds stop strings."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._owner: dict[str, tuple[RequestState, SampleState]] = {}  # child request id -> its state
        self.logprobs = LogprobsProcessor(tokenizer)

    def add(self, state: RequestState) -> None:
        self.states[state.request_id] = state
        for sample in state.samples:
            self._owner[sample.request.request_id] = (state, sample)

    def new_detokenizer(self, prompt_token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if not params.detokenize or self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer,
            prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def process(
        self,
        updated: list[Request],
        runner_output: RunnerOutput | None = None,
        scheduler_output: SchedulerOutput | None = None,
    ) -> tuple[list[RequestOutput], list[str]]:
        """Consume requests that got new tokens (and the step's logprobs, when given).

        Returns the outputs to emit (one per touched user request) and the
        child request ids that a stop string ended (the scheduler must finish them).
        """
        now = time.time()
        touched: dict[str, RequestState] = {}
        ended: set[str] = set()  # user requests with a sample that finished in this call
        stopped: list[str] = []
        if runner_output is not None and runner_output.prompt_logprobs and scheduler_output is not None:
            self._add_prompt_logprobs(runner_output, scheduler_output)
        sample_logprobs = runner_output is not None and bool(runner_output.logprobs)
        owners = self._owner
        for request in updated:
            owner = owners.get(request.request_id)
            if owner is None:
                continue
            state, sample = owner
            if sample.finish_reason is not None:
                continue
            detok = sample.detokenizer
            params = state.params
            if detok is not None and (
                # Without stop strings, a final-only request needs its text once, at the end.
                params.output_kind != "final_only" or params.stop or request.is_finished
            ):
                new_ids = request.output_token_ids[sample.num_detokenized :]
                stop = None
                for i, token_id in enumerate(new_ids):  # one at a time: a stop string ends at its token
                    stop = detok.update([token_id])
                    if stop is not None:
                        # Speculative decoding may have appended tokens past it: they were never generated,
                        # nor was the length / stop token that finished the request after them.
                        dropped = len(new_ids) - i - 1
                        _truncate(request, dropped)
                        if dropped and request.is_finished:
                            sample.finish_reason, sample.stop_reason = "stop", stop
                        break
                sample.num_detokenized = request.num_output_tokens
                if stop is not None and not request.is_finished:
                    sample.finish_reason, sample.stop_reason = "stop", stop
                    stopped.append(request.request_id)
            if sample_logprobs and params.logprobs is not None:
                assert runner_output is not None
                self._add_sample_logprobs(sample, request, runner_output, params.logprobs)
            metrics = state.metrics
            if metrics.first_token_time is None and request.output_token_ids:
                metrics.first_token_time = now
            metrics.last_token_time = now
            if request.num_preemptions > metrics.num_preemptions:
                metrics.num_preemptions = request.num_preemptions
            if request.num_cached_tokens > metrics.num_cached_tokens:
                metrics.num_cached_tokens = request.num_cached_tokens
            if request.num_draft_tokens:
                _add_spec_metrics(metrics, state)
            if sample.finish_reason is None and request.is_finished:
                sample.finish_reason = request.status.finish_reason
                sample.stop_reason = request.stop_reason
                if detok is not None:
                    detok.flush()
            if sample.finish_reason is not None:
                ended.add(state.request_id)
            touched[state.request_id] = state
        # A user request can only become finished in a call that finished one of its samples.
        outputs = [
            self._make_output(state, now)
            for state in touched.values()
            if state.params.output_kind != "final_only" or (state.request_id in ended and state.finished)
        ]
        return outputs, stopped

    def _add_sample_logprobs(self, sample: SampleState, request: Request, out: RunnerOutput, k: int) -> None:
        entries = (out.logprobs or {}).get(request.request_id) or []
        ranks = (out.logprob_ranks or {}).get(request.request_id)
        # Tokens after a stop token are dropped by the scheduler: keep only the appended ones.
        new = request.num_output_tokens - len(sample.logprobs)
        for j, entry in enumerate(entries[: max(new, 0)]):
            chosen = request.output_token_ids[len(sample.logprobs)]
            rank = ranks[j] if ranks is not None else None
            sample.logprobs.append(self.logprobs.make(entry, chosen, rank, k))
            sample.cumulative_logprob += entry[chosen]

    def _add_prompt_logprobs(self, out: RunnerOutput, scheduler_output: SchedulerOutput) -> None:
        start_of = {s.request_id: s.start_pos for s in scheduler_output.scheduled}
        for request_id, entries in (out.prompt_logprobs or {}).items():
            owner = self._owner.get(request_id)
            if owner is None or owner[1].index != 0:
                continue  # n > 1: the first sample's prompt logprobs stand for all
            state = owner[0]
            k = state.params.prompt_logprobs or 0
            ranks = (out.prompt_logprob_ranks or {}).get(request_id)
            first = start_of[request_id] + 1  # the prompt index scored by entries[0]
            # A preempted request recomputes its prompt: skip entries already recorded.
            skip = len(state.prompt_logprobs) - first
            for j in range(max(skip, 0), len(entries)):
                target = state.prompt_token_ids[first + j]
                rank = ranks[j] if ranks is not None else None
                state.prompt_logprobs.append(self.logprobs.make(entries[j], target, rank, k))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark all samples of a user request aborted and return its final output."""
        state = self.states.get(request_id)
        if state is None:
            return None
        for sample in state.samples:
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        return self._make_output(state, time.time())

    def _make_output(self, state: RequestState, now: float) -> RequestOutput:
        finished = state.finished
        if finished:
            state.metrics.finished_time = now
            self.states.pop(state.request_id, None)
            for sample in state.samples:
                self._owner.pop(sample.request.request_id, None)
        params = state.params
        if params.output_kind == "delta":
            completions = [c for sample in state.samples if (c := _delta(sample, params)) is not None]
        else:
            with_logprobs = params.logprobs is not None
            # Positional arguments, in CompletionOutput's field order: this runs for every streamed request
            # every step, and keywords cost about twice as much.
            completions = [
                CompletionOutput(
                    sample.index,
                    sample.detokenizer.text(sample.finish_reason is not None) if sample.detokenizer else "",
                    sample.request.output_token_ids[:],
                    sample.cumulative_logprob if with_logprobs else None,
                    sample.logprobs[:] if with_logprobs else None,
                    sample.finish_reason,  # type: ignore[arg-type]
                    sample.stop_reason,
                )
                for sample in state.samples
            ]
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            start = state.num_sent_prompt_logprobs if params.output_kind == "delta" else 0
            prompt_logprobs = state.prompt_logprobs[start:]
            state.num_sent_prompt_logprobs = len(state.prompt_logprobs)
        return RequestOutput(  # positional, in RequestOutput's field order (as above)
            state.request_id,
            state.prompt,
            state.prompt_token_ids,
            completions,
            finished,
            state.metrics,
            prompt_logprobs,
            state.metrics.num_cached_tokens,
        )


def _delta(sample: SampleState, params: SamplingParams) -> CompletionOutput | None:
    """What the sample produced since its last output (None: nothing, and its finish was sent): new tokens,
    text and logprobs; ``cumulative_logprob`` stays the running total, as in vLLM's DELTA outputs."""
    done = sample.finish_reason is not None
    tokens = sample.request.output_token_ids
    text = sample.detokenizer.text(done) if sample.detokenizer is not None else ""
    start, chars = sample.num_sent_tokens, sample.num_sent_chars
    if len(tokens) == start and len(text) == chars and (not done or sample.finish_sent):
        return None
    sample.num_sent_tokens, sample.num_sent_chars, sample.finish_sent = len(tokens), len(text), done
    return CompletionOutput(
        index=sample.index,
        text=text[chars:],
        token_ids=tokens[start:],
        cumulative_logprob=sample.cumulative_logprob if params.logprobs is not None else None,
        logprobs=sample.logprobs[start:] if params.logprobs is not None else None,
        finish_reason=sample.finish_reason,  # type: ignore[arg-type]
        stop_reason=sample.stop_reason,
    )


def _truncate(request: Request, num_tokens: int) -> None:
    """Drop the last ``num_tokens`` output tokens (the request is about to finish)."""
    if num_tokens:
        del request.output_token_ids[-num_tokens:]
        del request.all_token_ids[-num_tokens:]


def _add_spec_metrics(metrics: RequestMetrics, state: RequestState) -> None:
    """Speculative decoding counts, summed over the request's samples."""
    drafted: list[int] = []
    accepted: list[int] = []
    for s in state.samples:
        r = s.request
        for total, counts in ((drafted, r.drafted_per_position), (accepted, r.accepted_per_position)):
            total.extend([0] * (len(counts) - len(total)))
            for i, count in enumerate(counts):
                total[i] += count
    metrics.num_draft_tokens = sum(s.request.num_draft_tokens for s in state.samples)
    metrics.num_accepted_tokens = sum(s.request.num_accepted_tokens for s in state.samples)
    metrics.drafted_per_position, metrics.accepted_per_position = drafted, accepted
