"""The scheduler's per-step decision: plain data, no tensors.

Every platform's model runner (torch, MLX, ...) consumes this unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvik.pooling.params import PoolingParams
from kvik.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np

    from kvik.lora.request import LoRARequest
    from kvik.structured.manager import StructuredStep


@dataclass(slots=True)
class ScheduledRequest:
    """The work for one request in one step."""

    request_id: str
    # Tokens to compute this step; token_ids[0] sits at position start_pos.
    token_ids: list[int]
    start_pos: int  # == num_computed_tokens before this step
    # Block-table delta: the block ids appended to the request's table since the runner
    # last saw it; the whole table when ``full_block_table`` (the first time the request
    # is scheduled, and again after a preemption). Runners keep the tables (see
    # kvik.worker.kit.BlockTables); the table then covers start_pos + len(token_ids).
    new_block_ids: list[int]
    # True when this step reaches the end of the known tokens: a token is sampled
    # from the last position. False for a prefill chunk that is not the last.
    sample: bool
    sampling_params: SamplingParams
    # Shared with the Request (read-only for runners): penalties and seeded
    # sampling read them. len(output_token_ids) is the index of the next sample.
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    # Async scheduling: the last ``num_pending_tokens`` of token_ids (0 or 1) are
    # placeholders for the token the previous step is sampling; a runner with
    # ``supports_async_scheduling`` takes it from that step's samples on the device.
    num_pending_tokens: int = 0
    # Outputs sampled by steps in flight and not yet in output_token_ids: the
    # token this step samples sits at len(output_token_ids) + num_pending_outputs.
    num_pending_outputs: int = 0
    # True: new_block_ids is the whole table (replace the runner's row); False: append them.
    full_block_table: bool = True
    # Speculative decoding: the last len(draft_token_ids) of token_ids are proposed tokens
    # (sample is True). The runner scores all of them plus the last real token and returns
    # the accepted drafts plus one sampled token (kvik.spec_decode.verify).
    draft_token_ids: list[int] = field(default_factory=list)
    # A pooling request (its ``sample`` is always False): the runner pools its hidden states and
    # reports the vector in ``RunnerOutput.pooled`` in the step that reaches its last prompt token.
    pooling_params: PoolingParams | None = None
    # The adapter this request runs under (None: the base model); runners with ``supports_lora``
    # compute its rows with the adapter's slot (kvik.lora). At most max_loras distinct per step.
    lora_request: LoRARequest | None = None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    # Requests that ended or were preempted since the last step: runners drop
    # any per-request state they keep (generators, block-table rows). A request
    # scheduled again after a preemption comes with its whole table.
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Structured output: the requests (sampling this step) a grammar constrains and their
    # allowed-token bitmask, computed off-thread while the model runs. Runners that
    # support structured output read ``structured.request_ids`` / ``structured.bitmask()``.
    structured: StructuredStep | None = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RunnerOutput:
    """What a model runner returns for one step."""

    # request_id -> sampled token ids (one per step today; several with spec decode)
    sampled_token_ids: dict[str, list[int]]
    # request_id -> per sampled token: {token_id: logprob} (top-k plus the chosen one)
    logprobs: dict[str, list[dict[int, float]]] | None = None
    # request_id -> per prompt position (computed this step): {token_id: logprob}
    prompt_logprobs: dict[str, list[dict[int, float]]] | None = None
    # Optional, aligned with the two above: the chosen / actual prompt token's rank in
    # the raw distribution (1 = most likely). Runners that omit them give rank None
    # when the chosen token is outside the top k.
    logprob_ranks: dict[str, list[int]] | None = None
    prompt_logprob_ranks: dict[str, list[int]] | None = None
    # request_id -> the pooled (and, for classifiers, head-projected) float32 vector of a pooling
    # request that finished its prompt this step: a list or a 1-D numpy array (cheaper for long vectors).
    pooled: dict[str, list[float] | np.ndarray] | None = None
    # Speculative decoding with a drafter on the runner (draft model, EAGLE): request_id -> the
    # tokens it proposes for the request's next step (kvik.spec_decode.drafter).
    draft_token_ids: dict[str, list[int]] | None = None
