"""The scheduler's view of one request (one sample of a user's request)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvik.lora.request import LoRARequest
from kvik.pooling.params import PoolingParams
from kvik.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Every status from here on is final.
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12

    @property
    def is_finished(self) -> bool:
        return self >= FIRST_FINISHED

    @property
    def finish_reason(self) -> str | None:
        return {10: "stop", 11: "length", 12: "abort"}.get(int(self))


FIRST_FINISHED = int(RequestStatus.FINISHED_STOPPED)  # a plain int: compared per request per step


@dataclass(slots=True, eq=False)
class Request:
    """Tokens, progress and state of one sequence.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; the
    scheduler's only job is to make it catch up with ``num_tokens``.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None here
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0
    # Extra keys mixed into every block hash (LoRA id, cache salt, ...).
    cache_extra_keys: tuple[object, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    # Tokens sampled by a step in flight but not yet appended (async scheduling):
    # the scheduler already counts them, the runner feeds them from the device.
    num_output_placeholders: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    reads_output_history: bool = False  # from sampling_params, read every step by the engine
    # Speculative decoding: drafts proposed for the next step, and the drafts of the step in
    # flight (its KV past the accepted ones is rolled back when the step's tokens land).
    draft_token_ids: list[int] = field(default_factory=list)
    num_scheduled_drafts: int = 0
    num_draft_tokens: int = 0  # drafts verified so far
    num_accepted_tokens: int = 0  # of which accepted
    drafted_per_position: list[int] = field(default_factory=list)  # [i]: steps that verified a draft i
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: steps whose draft i was accepted
    # A pooling request: prefilled, never sampled; finishes with ``pooled`` set (kvik.pooling).
    pooling_params: PoolingParams | None = None
    pooled: list[float] | np.ndarray | None = None  # the runner's raw vector, set when the request finishes
    # The LoRA adapter it runs under (None: the base model). Its cache_key is among cache_extra_keys,
    # so its KV blocks are never shared with another adapter's or the base model's.
    lora_request: LoRARequest | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        self.reads_output_history = self.sampling_params.reads_output_history
        if self.lora_request is not None and self.lora_request.cache_key not in self.cache_extra_keys:
            self.cache_extra_keys = (*self.cache_extra_keys, self.lora_request.cache_key)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status >= FIRST_FINISHED  # RequestStatus.is_finished, without a second property call

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
