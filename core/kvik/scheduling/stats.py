"""A snapshot of the scheduler's state for logging and metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of usable KV blocks held by requests, in [0, 1]
    num_free_blocks: int
    # Prefix cache, in tokens, counted when a request is admitted (a resumed
    # preempted request counts again). Both 0 with prefix caching off.
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int  # total since start
    num_steps: int  # schedule() calls that scheduled at least one token
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens verified since start
    spec_accepted_tokens: int = 0  # of which accepted
    spec_accepted_per_position: tuple[int, ...] = ()  # [i]: verify steps that accepted draft i
    spec_drafted_per_position: tuple[int, ...] = ()  # [i]: verify steps that drafted at least i + 1 tokens

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens / queried tokens (0.0 before any query)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
