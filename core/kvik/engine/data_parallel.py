"""Data parallelism: D engine replicas behind one AsyncLLM-shaped front (``kvik serve --data-parallel-size D``).

Each replica is a whole engine (its own scheduler, KV cache and ranks on its own
devices: replica ``r`` uses devices ``[r * tp * pp, (r + 1) * tp * pp)``). The router
sends each request to one replica, by one of two policies:

- ``least_loaded``: the replica with the fewest unfinished requests (ties in turn);
- ``prefix``: the replica a hash of the prompt's first :data:`PREFIX_TOKENS` tokens names,
  so prompts sharing a system prompt meet the same prefix cache, unless that replica has
  :data:`PREFIX_SLACK` more unfinished requests than the least loaded (then least-loaded).

Statistics are merged (sums, the mean KV usage), so ``/metrics`` reports the whole server.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import fields
from typing import Any

from kvik.config import ResolvedConfig
from kvik.engine.async_llm import AsyncLLM
from kvik.engine.llm_engine import EngineStats, LLMEngine
from kvik.outputs import RequestOutput
from kvik.pooling.outputs import PoolingRequestOutput
from kvik.pooling.params import PoolingParams
from kvik.sampling_params import SamplingParams

ROUTING = ("least_loaded", "prefix")
PREFIX_TOKENS = 64  # a system prompt's worth: long enough to tell prompts apart, short enough to share
PREFIX_SLACK = 8  # unfinished requests a prefix-chosen replica may exceed the least loaded by


class DataParallelLLM:
    """Routes requests over ``replicas`` (AsyncLLMs of the same model); the server's engine interface."""

    def __init__(self, replicas: Sequence[AsyncLLM], routing: str = "least_loaded") -> None:
        if not replicas:
            raise ValueError("data parallelism needs at least one replica")
        if routing not in ROUTING:
            raise ValueError(f"routing must be one of {', '.join(ROUTING)}, got {routing!r}")
        self.replicas = list(replicas)
        self.routing = routing
        self._owner: dict[str, AsyncLLM] = {}  # live request id -> its replica
        self._turn = 0  # where the next tie-break starts

    @classmethod
    def from_engine_args(
        cls, data_parallel_size: int, routing: str = "least_loaded", model_name: str | None = None, **kwargs: Any
    ) -> DataParallelLLM:
        """Build ``data_parallel_size`` replicas one after another (each on its own devices)."""
        if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be an integer >= 1, got {data_parallel_size!r}")
        replicas: list[AsyncLLM] = []
        try:
            for rank in range(data_parallel_size):
                replicas.append(AsyncLLM.from_engine_args(model_name=model_name, data_parallel_rank=rank, **kwargs))
        except BaseException:
            for replica in replicas:
                replica.engine.shutdown()
            raise
        return cls(replicas, routing)

    # -- what the server reads -----------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        return self.replicas[0].engine  # model facts (pooling task, ...) are the same on every replica

    @property
    def tokenizer(self) -> Any:
        return self.replicas[0].tokenizer

    @property
    def model_config(self) -> Any:
        return self.replicas[0].model_config

    @property
    def config(self) -> ResolvedConfig:
        return self.replicas[0].config

    @property
    def model_name(self) -> str:
        return self.replicas[0].model_name

    @property
    def error(self) -> BaseException | None:
        return next((r.error for r in self.replicas if r.error is not None), None)

    def is_healthy(self) -> bool:
        return all(r.is_healthy() for r in self.replicas)

    @property
    def num_unfinished(self) -> int:
        return sum(r.num_unfinished for r in self.replicas)

    def get_stats(self) -> EngineStats:
        return merge_stats([r.get_stats() for r in self.replicas])

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for replica in self.replicas:
            replica.start()

    async def shutdown(self, grace_period: float = 0.0) -> None:
        await asyncio.gather(*(r.shutdown(grace_period) for r in self.replicas))

    # -- routing ---------------------------------------------------------------------------
    def pick(self, prompt: str | Sequence[int]) -> AsyncLLM:
        # Ties go round-robin, so requests that arrive one at a time still use every replica.
        self._turn = (self._turn + 1) % len(self.replicas)
        order = self.replicas[self._turn :] + self.replicas[: self._turn]
        least = min(order, key=lambda r: r.num_unfinished)
        if self.routing == "least_loaded" or len(self.replicas) == 1:
            return least
        head = prompt[:PREFIX_TOKENS * 4] if isinstance(prompt, str) else list(prompt[:PREFIX_TOKENS])
        digest = hashlib.blake2b(repr(head).encode(), digest_size=8).digest()
        chosen = self.replicas[int.from_bytes(digest, "little") % len(self.replicas)]
        return chosen if chosen.num_unfinished <= least.num_unfinished + PREFIX_SLACK else least

    async def generate(
        self, prompt: str | Sequence[int], sampling_params: SamplingParams | None, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        replica = self.pick(prompt)
        self._owner[request_id] = replica
        try:
            async for output in replica.generate(prompt, sampling_params, request_id, priority):
                yield output
        finally:
            self._owner.pop(request_id, None)

    async def encode_batch(
        self, prompts: Sequence[str | Sequence[int]], params: PoolingParams, request_ids: Sequence[str]
    ) -> list[PoolingRequestOutput]:
        replica = self.pick(prompts[0] if prompts else "")
        for rid in request_ids:
            self._owner[rid] = replica
        try:
            return await replica.encode_batch(prompts, params, request_ids)
        finally:
            for rid in request_ids:
                self._owner.pop(rid, None)

    async def abort(self, request_id: str) -> None:
        replica = self._owner.get(request_id)
        if replica is not None:
            await replica.abort(request_id)


def merge_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """One replica-wide view: counters summed, KV usage averaged, the latest step time."""
    merged: dict[str, Any] = {}
    for f in fields(EngineStats):
        values = [getattr(s, f.name) for s in stats]
        if f.name == "kv_cache_usage":
            merged[f.name] = sum(values) / len(values)
        elif f.name == "last_step_time":
            merged[f.name] = max(values)
        elif isinstance(values[0], tuple):  # per-position counters: summed position by position
            width = max((len(v) for v in values), default=0)
            merged[f.name] = tuple(sum(v[i] for v in values if i < len(v)) for i in range(width))
        elif isinstance(values[0], str):  # a label (the speculative method): the replicas share it
            merged[f.name] = next((v for v in values if v), "")
        else:
            merged[f.name] = sum(values)
    return EngineStats(**merged)
