"""What a sampler needs to know about one step's rows: plain data, no tensors.

Every runner (torch, MLX, ...) describes the rows it samples with a
:class:`SamplingBatch` and finds the prompt positions that need prompt
logprobs with :func:`prompt_logprob_rows`; both import no array library
beyond numpy, so a runner that does not use torch shares them unchanged.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvik.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvik.scheduling.output import ScheduledRequest
    from kvik.structured.manager import StructuredStep

_MASK64 = (1 << 64) - 1
_sampling_params = operator.attrgetter("sampling_params")
_output_token_ids = operator.attrgetter("output_token_ids")
_prompt_token_ids = operator.attrgetter("prompt_token_ids")
_num_pending_outputs = operator.attrgetter("num_pending_outputs")
_prompt_logprobs = operator.attrgetter("sampling_params.prompt_logprobs")


@dataclass(slots=True)
class SamplingBatch:
    """Per-row inputs of one sampling call (rows align with the logits)."""

    params: list[SamplingParams]
    # Index of the token being sampled in each row's output (len(output_token_ids)).
    output_positions: list[int]
    # Token history for penalties (read-only); filled by the runner when needed.
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    output_token_ids: list[list[int]] = field(default_factory=list)
    # The model's EOS ids: min_tokens masks them (with each row's stop_token_ids).
    eos_token_ids: frozenset[int] = frozenset()
    # Structured output: the rows a grammar constrains, and a callable returning their
    # packed allowed-token bitmask [len(bitmask_rows), ceil(vocab / 32)] int32 (it may
    # wait for a computation that overlapped the forward pass).
    bitmask_rows: list[int] = field(default_factory=list)
    bitmask: Callable[[], np.ndarray] | None = None
    _distinct: list[SamplingParams] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def distinct_params(self) -> list[SamplingParams]:
        """The rows' SamplingParams objects, each once (computed on first use: fill ``params`` first).

        Rows mostly share a few objects (``LLM.generate`` gives every request the same one), so
        "does any row ask for X" is answered over these instead of once per row per step.
        """
        if self._distinct is None:
            self._distinct = distinct(self.params)
        return self._distinct


def sampling_batch(
    reqs: list[ScheduledRequest], eos_token_ids: frozenset[int], structured: StructuredStep | None = None
) -> SamplingBatch:
    """The batch for the requests ``reqs`` that sample this step (one row each, in order).

    A row's output position counts the outputs still in flight (async
    scheduling), so a seeded row draws the same noise whatever the overlap.
    """
    outputs = list(map(_output_token_ids, reqs))  # map/attrgetter: no Python frame per row
    batch = SamplingBatch(
        params=list(map(_sampling_params, reqs)),
        output_positions=list(map(operator.add, map(len, outputs), map(_num_pending_outputs, reqs))),
        prompt_token_ids=list(map(_prompt_token_ids, reqs)),
        output_token_ids=outputs,
        eos_token_ids=eos_token_ids,
    )
    if structured is not None and structured.request_ids:
        row_of = {r.request_id: i for i, r in enumerate(reqs)}
        batch.bitmask_rows = [row_of[rid] for rid in structured.request_ids]
        batch.bitmask = structured.bitmask
    return batch


def distinct(params: list[SamplingParams]) -> list[SamplingParams]:
    """``params`` without repeats of the same object, in first-seen order (C-level: no frame per row)."""
    return list(dict(zip(map(id, params), params, strict=True)).values())


def row_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for (request seed, output position) (splitmix64 mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass(slots=True)
class PromptRows:
    """Prompt positions of one request computed this step, whose logits score the next prompt token."""

    index: int  # the request's index in the step
    rows: np.ndarray  # [m] rows of the step's flattened tokens
    targets: list[int]  # [m] the prompt token each row scores


def prompt_logprob_rows(scheduled: list[ScheduledRequest]) -> list[PromptRows]:
    """Rows needing prompt logprobs: position ``p`` scores prompt token ``p + 1`` (the last prompt
    position predicts the first output token and is left to sampling)."""
    if list(map(_prompt_logprobs, scheduled)).count(None) == len(scheduled):
        return []  # the usual step: nobody asks (a C-level pass, no Python frame per request)
    found = []
    offset = 0
    for i, req in enumerate(scheduled):
        n = len(req.token_ids)
        if req.sampling_params.prompt_logprobs is not None:
            prompt = req.prompt_token_ids
            end = min(req.start_pos + n, len(prompt) - 1)
            if end > req.start_pos:
                rows = np.arange(offset, offset + end - req.start_pos)
                found.append(PromptRows(i, rows, list(prompt[req.start_pos + 1 : end + 1])))
        offset += n
    return found
