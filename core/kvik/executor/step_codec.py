"""Sending a step to worker processes without resending every request's tokens every step.

``ScheduledRequest`` carries each request's prompt and output token lists (penalties and
seeded sampling read them). Pickled whole, a batch of 256 requests with 512-token prompts
is ~150k integers per step and per rank; sent as deltas it is the new tokens only. The
encoder (engine side) strips what each rank already has; the decoder (worker side) keeps
the lists and puts them back, so the runner sees exactly the engine's ``SchedulerOutput``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvik.scheduling.output import SchedulerOutput


@dataclass(slots=True)
class EncodedStep:
    output: SchedulerOutput  # token lists replaced by what the worker lacks
    new_prompt: list[bool] = field(default_factory=list)  # per scheduled request: prompt_token_ids is whole


class StepEncoder:
    """Engine side: remembers how much of each live request's token lists the workers hold."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = {}  # request id -> output tokens sent so far

    def encode(self, step: SchedulerOutput) -> EncodedStep:
        for rid in step.finished_request_ids:
            self._sent.pop(rid, None)
        scheduled, new_prompt = [], []
        for req in step.scheduled:
            sent = self._sent.get(req.request_id)
            outputs = req.output_token_ids
            if sent is None or sent > len(outputs):  # first time seen (or a reused id): everything
                whole = replace(req, prompt_token_ids=list(req.prompt_token_ids), output_token_ids=list(outputs))
                scheduled.append(whole)
                new_prompt.append(True)
            else:
                scheduled.append(replace(req, prompt_token_ids=[], output_token_ids=list(outputs[sent:])))
                new_prompt.append(False)
            self._sent[req.request_id] = len(outputs)
        return EncodedStep(replace(step, scheduled=scheduled), new_prompt)


class StepDecoder:
    """Worker side: holds each live request's token lists and restores them into the step."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[list[int], list[int]]] = {}  # request id -> (prompt, outputs)

    def decode(self, encoded: EncodedStep) -> SchedulerOutput:
        step = encoded.output
        for rid in step.finished_request_ids:
            self._tokens.pop(rid, None)
        for req, whole in zip(step.scheduled, encoded.new_prompt, strict=True):
            if whole:
                self._tokens[req.request_id] = (req.prompt_token_ids, req.output_token_ids)
            else:
                prompt, outputs = self._tokens[req.request_id]
                outputs.extend(req.output_token_ids)
                req.prompt_token_ids, req.output_token_ids = prompt, outputs
        return step
