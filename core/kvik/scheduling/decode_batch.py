"""The scheduler's steady decode step, in one pass over the running requests.

On the GPU the SmolLM2 shape's batch-256 decode graph replays in ~1.1 ms, so every millisecond of host
work per step is idle GPU time (docs/benchmarks.md, "Host time per decode step"). The scheduler's general
loop makes, for each running request, a few method calls (how many tokens, allocate, build the
:class:`ScheduledRequest`, publish filled blocks): ~2.3 µs a request on the development VM. When every
running request has at most one token to compute and nothing else is going on (no drafts, adapters,
windows, pooling or pipeline micro-batches; budget and free blocks for all), every decision is the same
simple one, and :func:`schedule_decodes` makes it inline, handing the few requests that cross into a new
block (or fill one for the prefix cache) to the KV-cache manager.

It returns None, having changed nothing, where the step is not such a step, and the scheduler runs its
general loop. Both give the same result: ``tests/core/scheduling/test_decode_batch.py`` runs random
workloads through a scheduler with the pass and one without and compares them step by step.
"""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING

from kvik.request import Request
from kvik.scheduling.output import ScheduledRequest

if TYPE_CHECKING:
    from kvik.scheduling.scheduler import Scheduler

_request_id = attrgetter("request_id")


def schedule_decodes(scheduler: Scheduler, budget: int) -> list[ScheduledRequest] | None:
    """The step's work for every running request when each has at most one token to compute, there is
    budget and pool room for all, and none drafts, slides, pools or runs under an adapter: the scheduled
    requests (in running order, each advanced as :meth:`Scheduler._make_scheduled` does, their newly
    filled blocks published to the prefix cache), or None, having changed nothing."""
    running = scheduler.running
    kv_cache = scheduler.kv_cache
    if not running or len(running) > budget or scheduler.micro_batches != 1 or kv_cache.windowed:
        return None
    max_len, pending_tokens = scheduler._max_len, scheduler.pending_tokens
    decodes: list[Request] = []  # those with one token to compute
    for r in running:
        if r.draft_token_ids or r.num_scheduled_drafts or r.lora_request is not None or r.pooling_params is not None:
            return None
        placeholders = r.num_output_placeholders
        num_tokens = len(r.all_token_ids)
        if placeholders and (
            not pending_tokens or len(r.output_token_ids) + placeholders >= r.max_tokens or num_tokens + placeholders >= max_len
        ):
            continue  # it waits for the token in flight (Scheduler._num_new_tokens)
        num_new = num_tokens + placeholders - r.num_computed_tokens
        if num_new == 1:
            decodes.append(r)
        elif num_new:
            return None  # a prefill (chunk) to compute: the general loop
    if not decodes:
        return []
    crossing = kv_cache.allocate_decode_slots(decodes)
    if crossing is None:
        return None  # the pool is short: the general loop preempts
    request_ids = list(map(_request_id, decodes))
    # Block-table deltas: a running request's table was sent whole when it was scheduled before (and is
    # sent whole again after a preemption), and grows only where it is scheduled, so only the requests
    # given a block now, and any not sent before, have a delta.
    sent = scheduler._sent_blocks
    whole_table = [rid not in sent for rid in request_ids]
    new_block_ids: list[list[int]] = [[] for _ in decodes]
    changed = crossing
    if any(whole_table):
        given = set(crossing)
        changed = [i for i, whole in enumerate(whole_table) if whole or i in given]
    for i, ids in zip(changed, kv_cache.new_block_ids([request_ids[i] for i in changed], sent), strict=True):
        new_block_ids[i] = ids
    # Positional arguments, in ScheduledRequest's field order (checked where Scheduler._make_scheduled is).
    # The token at num_computed_tokens is known (no placeholder) or still being sampled (0, filled on the device).
    scheduled = [
        ScheduledRequest(
            rid,
            [0] if r.num_output_placeholders else [r.all_token_ids[-1]],
            r.num_computed_tokens,
            blocks,
            True,
            r.sampling_params,
            r.prompt_token_ids,
            r.output_token_ids,
            1 if r.num_output_placeholders else 0,
            r.num_output_placeholders,
            whole,
            [],
        )
        for r, rid, blocks, whole in zip(decodes, request_ids, new_block_ids, whole_table, strict=True)
    ]
    # Advance each: its token counts as computed once handed to the runner, and the step samples its next
    # token (num_scheduled_drafts is 0 and draft_token_ids empty already).
    for r in decodes:
        r.num_computed_tokens += 1
        r.num_output_placeholders += 1
    return scheduled
