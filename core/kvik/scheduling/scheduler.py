"""Continuous batching with one token budget per step.

Every request carries ``num_computed_tokens`` (tokens whose KV is in the cache);
each step the scheduler lets each request catch up with ``num_tokens``, within
``max_num_batched_tokens`` tokens and ``max_num_seqs`` requests. A prefill is
the catch-up of many tokens, a decode the catch-up of the one sampled last step;
chunked prefill is a catch-up cut short by the budget; a prefix-cache hit is a
catch-up done for free. There is no prefill/decode mode.

The engine loop is ``schedule() -> runner.execute(output) -> update_from_output()``.
``num_computed_tokens`` advances in :meth:`Scheduler.schedule` (the step's tokens
count as computed once handed to the runner), which also publishes the blocks
the step fills to the prefix cache; :meth:`Scheduler.update_from_output` appends
the sampled tokens and applies the token-level stop rules. Stop *strings* are
the detokenizer's: it calls :meth:`finish_requests`.

Async scheduling: the engine may call ``schedule()`` for step n+1 before
``update_from_output()`` of step n. A token that step n will sample counts as an
*output placeholder* from the moment step n is scheduled, so step n+1 can
already schedule its decode (its id is unknown on the host: the runner takes it
from step n's samples on the device). A request that step n finishes wastes its
slot in step n+1, whose result for it is dropped. Blocks are published to the
prefix cache only over known tokens.

LoRA: a step holds requests of at most ``max_loras`` distinct adapters (the runner's
slots). A running request whose adapter finds no slot sits the step out; a waiting
one is skipped (requests behind it whose adapter is in the step may start) and keeps
its place in the queue. So is a waiting one whose adapter is still being read in the
background (``lora_loading``), unless the step would otherwise be empty.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import fields
from operator import attrgetter, itemgetter

from kvik.request import FIRST_FINISHED, Request, RequestStatus
from kvik.scheduling.decode_batch import schedule_decodes
from kvik.scheduling.kv_cache_manager import KVCacheManager, blocks_held_at_most, longest_fitting_request
from kvik.scheduling.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from kvik.scheduling.request_queue import create_request_queue
from kvik.scheduling.stats import SchedulerStats

logger = logging.getLogger(__name__)
_first, _second = itemgetter(0), itemgetter(1)
_request_id = attrgetter("request_id")

# The order Scheduler._make_scheduled passes ScheduledRequest's fields in (positionally, for speed).
_SCHEDULED_FIELDS = (
    "request_id",
    "token_ids",
    "start_pos",
    "new_block_ids",
    "sample",
    "sampling_params",
    "prompt_token_ids",
    "output_token_ids",
    "num_pending_tokens",
    "num_pending_outputs",
    "full_block_table",
    "draft_token_ids",
    "pooling_params",
    "lora_request",
)
assert tuple(f.name for f in fields(ScheduledRequest))[: len(_SCHEDULED_FIELDS)] == _SCHEDULED_FIELDS, (
    "ScheduledRequest's fields changed order: update Scheduler._make_scheduled"
)


class Scheduler:
    """Decides, each step, which tokens of which requests the runner computes."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        policy: str = "fcfs",
        long_prefill_token_threshold: int = 0,
        max_loras: int = 0,
        pending_tokens: bool = True,
        micro_batches: int = 1,
        group_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        for name, value in (
            ("block_size", block_size),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0 (0 = off), got {long_prefill_token_threshold}")
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.policy = policy
        # LoRA: at most this many distinct adapters in one step (the runner's slots); 0 = no adapters.
        self.max_loras = max_loras
        # True while an adapter's weights are still being read in the background (the runner's
        # ``lora_loading``): a waiting request under it is not started in a step that has other work,
        # so the step does not stall every running request until the read ends. None: never.
        self.lora_loading: Callable[[int], bool] | None = None
        # Whether a request whose sampled token is still in flight may be scheduled again, its token filled
        # in on the device (async scheduling). Without it such a request waits for the step to finish, and
        # a second step in flight (pipeline parallelism) holds the requests the first does not.
        self.pending_tokens = pending_tokens
        # Pipeline parallelism: a step takes at most 1/micro_batches of the running requests, so a batch
        # that arrived at once splits into groups that alternate through the stages instead of leaving
        # every stage but one idle while it waits for its tokens.
        self.micro_batches = micro_batches
        # Per KV-cache group (kvik.scheduling.kv_cache_groups), the window its layers slide with (None: the
        # whole context): the blocks a window has passed are released as requests advance (vLLM frees them
        # the same way), so a long request holds ~window / block_size blocks of such a group, whatever its length.
        self.group_windows = group_windows
        # Only meaningful with chunked prefill: one request gets at most this many tokens per step.
        self.long_prefill_token_threshold = long_prefill_token_threshold if enable_chunked_prefill else 0
        self.waiting = create_request_queue(policy)
        self.kv_cache = KVCacheManager(num_blocks, block_size, max_model_len, enable_prefix_caching, group_windows)
        self.running: list[Request] = []  # admission order
        self.requests: dict[str, Request] = {}  # live (unfinished) requests
        # A sequence can never hold more blocks than the whole pool: a request
        # stops with "length" there, so a lone request always fits and
        # preemption can never deadlock. In a group whose layers slide, a request
        # holds at most the window's blocks and a step's, at any length.
        capacity = longest_fitting_request(
            self.kv_cache.pool.num_usable_blocks, block_size, group_windows, max_num_batched_tokens, max_model_len
        )
        if capacity < max_model_len:
            logger.warning(
                "the KV cache holds %d tokens (%d blocks of %d), less than max_model_len=%d: "
                "sequences will stop with finish_reason 'length' at %d tokens",
                capacity,
                num_blocks - 1,
                block_size,
                max_model_len,
                capacity,
            )
        self._max_len = min(max_model_len, capacity)
        self._finished_ids: list[str] = []  # reported once, in the next SchedulerOutput
        # Request id -> block ids already sent to the runner: each step sends only the
        # blocks appended since (a block-table delta). Absent: the next one sends the whole table.
        self._sent_blocks: dict[str, int] = {}
        self._num_preemptions = 0
        self._num_steps = 0
        self._spec_drafts = 0  # speculative decoding: draft tokens verified, and accepted
        self._spec_accepted = 0
        self._spec_accepted_per_position: list[int] = []
        self._spec_drafted_per_position: list[int] = []

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        """Queue a new request; ValueError (with advice) if it could never run."""
        n = request.num_prompt_tokens
        if request.lora_request is not None and self.max_loras < 1:
            raise ValueError(f"request {request.request_id!r} names a LoRA adapter but this scheduler has no LoRA slots")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use by an unfinished request")
        if n == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt; send at least one token")
        room = 0 if request.pooling_params is not None else 1  # a pooling request generates nothing
        if n + room > self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: the prompt has {n} tokens but max_model_len is "
                f"{self.max_model_len}; the prompt plus at least one generated token must fit. "
                "Shorten the prompt or raise max_model_len."
            )
        num_usable = self.kv_cache.pool.num_usable_blocks
        if self._blocks_held_at_most(n) > num_usable:
            raise ValueError(
                f"request {request.request_id!r}: the prompt has {n} tokens and needs {self._blocks_held_at_most(n)} "
                f"KV blocks of {self.block_size} tokens, but the whole KV cache has only {num_usable} blocks "
                f"({num_usable * self.block_size} tokens), so it could never run. Shorten the prompt or give "
                "the KV cache more memory / blocks."
            )
        if not self.enable_chunked_prefill and n > self.max_num_batched_tokens:
            raise ValueError(
                f"request {request.request_id!r}: the prompt has {n} tokens, more than max_num_batched_tokens="
                f"{self.max_num_batched_tokens}, and chunked prefill is off, so it can never be scheduled. "
                "Enable chunked prefill or raise max_num_batched_tokens."
            )
        if request.status != RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} must be new (status WAITING, nothing computed)")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End requests now (abort, or a stop string found by the detokenizer) and free their blocks.

        Unknown or already finished ids are ignored; ``status`` must be a
        finished one. The ids are reported in the next ``finished_request_ids``.
        """
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}")
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._release(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def reset_prefix_cache(self) -> None:
        self.kv_cache.reset_prefix_cache()

    def get_stats(self) -> SchedulerStats:
        pc = self.kv_cache.prefix_cache_stats
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_free_blocks=self.kv_cache.num_free_blocks,
            prefix_cache_queries=pc.queries,
            prefix_cache_hits=pc.hits,
            num_preemptions=self._num_preemptions,
            num_steps=self._num_steps,
            spec_draft_tokens=self._spec_drafts,
            spec_accepted_tokens=self._spec_accepted,
            spec_accepted_per_position=tuple(self._spec_accepted_per_position),
            spec_drafted_per_position=tuple(self._spec_drafted_per_position),
        )

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first (in order), then waiting ones.

        A running request that cannot get blocks preempts the lowest-priority
        running request (possibly itself). No waiting request is admitted in a
        step that preempted (the pool is full). Every scheduled request's
        ``num_computed_tokens`` is advanced by its token count before returning.
        """
        budget = self.max_num_batched_tokens
        scheduled: dict[str, tuple[Request, int]] = {}  # request id -> (request, num_new_tokens)
        preempted: list[Request] = []
        loras: set[int] = set()  # the adapters of this step's requests (at most max_loras)

        # The steady decode step in whole-batch passes, or (None) the per-request loop; the same result.
        decodes = schedule_decodes(self, budget)
        if decodes is None:
            budget = self._schedule_running(budget, scheduled, preempted, loras)
        else:
            budget -= len(decodes)

        skipped: list[Request] = []  # waiting requests whose adapter has no slot this step
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.peek()
            if request.num_output_placeholders:
                break  # preempted while its last token was in flight: resumable once that token lands
            busy = scheduled or decodes
            if not self._lora_fits(request, loras) or (busy and self._lora_still_loading(request, loras)):
                skipped.append(self.waiting.pop())  # later requests of the step's adapters may still run
                continue
            hits, num_hit_tokens = self.kv_cache.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if self.long_prefill_token_threshold:
                num_new = min(num_new, self.long_prefill_token_threshold)
            if not self.enable_chunked_prefill and budget < num_new <= self.max_num_batched_tokens:
                break  # the whole prompt fits a later step (only resumed sequences longer than a step get chunked)
            num_new = min(num_new, budget)
            if self.kv_cache.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.pop()
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = (request, num_new)
            budget -= num_new
            self._add_lora(request, loras)
            self.kv_cache.cache_blocks(request, num_hit_tokens + num_new)  # later admissions may share them
        for request in reversed(skipped):  # back in their places, ahead of everything they were ahead of
            self.waiting.prepend(request)

        picked = list(scheduled.values())
        if loras:
            # Rows of one adapter side by side: the SGMV kernels' tiles hold one adapter each
            # (kvik_cuda.lora_tiles), so interleaved rows would make one small tile per row.
            # The sort is stable, so each adapter's requests keep their order.
            picked.sort(key=lambda item: item[0].lora_request.lora_int_id if item[0].lora_request else 0)
        requests = list(map(_first, picked))
        request_ids = list(map(_request_id, requests))
        sent = list(map(self._sent_blocks.__contains__, request_ids))  # False: the whole table goes out
        new_block_ids = self.kv_cache.new_block_ids(request_ids, self._sent_blocks)
        made = list(map(self._make_scheduled, requests, map(_second, picked), new_block_ids, sent))
        out = SchedulerOutput(
            scheduled=decodes + made if decodes else made,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted_request_ids=[r.request_id for r in preempted],
        )
        if out.scheduled:
            # Finished ids ride on the next non-empty output: an engine may skip
            # the runner for an empty step, and the runner must still hear of them.
            out.finished_request_ids, self._finished_ids = self._finished_ids, []
            self._num_steps += 1
        return out

    def _schedule_running(
        self, budget: int, scheduled: dict[str, tuple[Request, int]], preempted: list[Request], loras: set[int]
    ) -> int:
        """Schedule running requests in order, one at a time, into ``scheduled`` (preempting into ``preempted``
        where the pool is short), and publish the blocks the step fills; returns the budget left."""
        i = 0
        running = self.running
        allocate = self.kv_cache.allocate_slots
        num_new_tokens = self._num_new_tokens
        windowed = self.kv_cache.windowed
        group = -(-len(running) // self.micro_batches)  # running requests one step takes at most
        while i < len(running) and budget > 0 and len(scheduled) < group:
            request = running[i]
            num_new = num_new_tokens(request, budget)
            if num_new == 0 or (request.lora_request is not None and not self._lora_fits(request, loras)):
                i += 1  # no work, or its adapter finds no slot this step: it waits (keeping its blocks)
                continue
            if windowed:
                # Before allocating, so a request holds at most blocks_held_at_most blocks. The runner is not
                # told: its row keeps the released ids, which no query of the request reads but masked (a
                # kernel's tile may straddle the window's edge), and every cache page holds finite K/V (zeroed
                # at allocation, written only with K/V), so they weigh exactly 0. Resending the table (every
                # group's, at every block boundary) cost ~1.5 ms a step at 64 requests of 32k tokens.
                self.kv_cache.release_behind_window(request)
            while allocate(request, num_new) is None:
                victim = self._choose_victim()
                j = self.running.index(victim)
                del self.running[j]
                if victim.request_id in scheduled:  # priority policy: un-schedule an earlier pick
                    budget += scheduled.pop(victim.request_id)[1]
                self._preempt(victim)
                preempted.append(victim)
                if j < i:
                    i -= 1
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted itself; the same index now holds the next request
            scheduled[request.request_id] = (request, num_new)
            budget -= num_new
            if request.lora_request is not None:
                self._add_lora(request, loras)
            i += 1
        # No request is un-scheduled from here on: publish the blocks this step fills.
        if scheduled:
            picked = list(scheduled.values())
            self.kv_cache.cache_scheduled(list(map(_first, picked)), list(map(_second, picked)))
        return budget

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[Request]:
        """Apply a step's results; return the requests that got new tokens (finished ones with their status).

        For each scheduled request still alive, each sampled token is appended and checked,
        in order: EOS (unless ``ignore_eos``), ``stop_token_ids`` (both only once
        ``min_tokens`` tokens exist), then length (``max_tokens`` or the model /
        KV-cache length). Tokens after a stop are dropped. Finished requests free
        their blocks and are reported in the next ``finished_request_ids``.
        """
        updated: list[Request] = []
        requests = self.requests
        sampled = runner_output.sampled_token_ids
        check_stop = self._check_stop
        any_finished = False
        for sched in scheduler_output.scheduled:
            if sched.pooling_params is not None:
                self._update_pooling(sched, runner_output, updated)
                any_finished = True
                continue
            if not sched.sample:
                continue
            request = requests.get(sched.request_id)
            if request is None:
                continue  # finished or aborted since it was scheduled: its token is dropped
            request.num_output_placeholders -= 1
            new_tokens = sampled.get(sched.request_id)
            if not new_tokens:
                # Without its token the request could never be scheduled again: fail loudly, not hang.
                raise RuntimeError(
                    f"the model runner returned no sampled token for request {sched.request_id!r}, "
                    "which was scheduled with sample=True"
                )
            status = request.status  # PREEMPTED: by a schedule() that ran ahead
            if request.num_scheduled_drafts:
                self._roll_back_drafts(request, len(new_tokens))
            for token_id in new_tokens:
                request.output_token_ids.append(token_id)  # Request.append_output_token, inlined (hot)
                request.all_token_ids.append(token_id)
                if check_stop(request, token_id):
                    break
            updated.append(request)
            if request.status >= FIRST_FINISHED:
                any_finished = True
                if status == RequestStatus.PREEMPTED:
                    self.waiting.remove(request)
                self._release(request)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return updated

    def _update_pooling(self, sched: ScheduledRequest, runner_output: RunnerOutput, updated: list[Request]) -> None:
        """A pooling request finishes (KV blocks freed) in the step that reaches its last prompt token."""
        request = self.requests.get(sched.request_id)
        if request is None or sched.start_pos + len(sched.token_ids) < request.num_prompt_tokens:
            return  # aborted since, or a prefill chunk before the last
        pooled = (runner_output.pooled or {}).get(sched.request_id)
        if pooled is None:
            raise RuntimeError(
                f"the model runner returned no pooled vector for pooling request {sched.request_id!r}; "
                "does this platform's runner support pooling models?"
            )
        if request.status == RequestStatus.PREEMPTED:  # by a schedule() that ran ahead: its vector is whole
            self.waiting.remove(request)
        request.pooled = pooled
        request.status = RequestStatus.FINISHED_STOPPED
        updated.append(request)
        self._release(request)  # update_from_output drops it from ``running``

    # ------------------------------------------------------------------ helpers
    def _blocks_held_at_most(self, num_tokens: int) -> int:
        """The most blocks a request of up to ``num_tokens`` tokens holds at once."""
        return blocks_held_at_most(num_tokens, self.block_size, self.group_windows, self.max_num_batched_tokens)

    def _lora_fits(self, request: Request, loras: set[int]) -> bool:
        """True when the request is a base-model one, or its adapter is in the step or a slot is left."""
        lora = request.lora_request
        return lora is None or lora.lora_int_id in loras or len(loras) < self.max_loras

    def _lora_still_loading(self, request: Request, loras: set[int]) -> bool:
        """True when the request's adapter is not in this step and its weights are still being read."""
        lora = request.lora_request
        return (
            lora is not None
            and lora.lora_int_id not in loras
            and self.lora_loading is not None
            and self.lora_loading(lora.lora_int_id)
        )

    @staticmethod
    def _add_lora(request: Request, loras: set[int]) -> None:
        if request.lora_request is not None:
            loras.add(request.lora_request.lora_int_id)

    def _roll_back_drafts(self, request: Request, num_sampled: int) -> None:
        """A verify step sampled ``num_sampled`` tokens: the accepted drafts plus one. The KV of
        the rejected drafts is dropped (their slots are rewritten by the next step)."""
        k, request.num_scheduled_drafts = request.num_scheduled_drafts, 0
        accepted = num_sampled - 1
        if not 0 <= accepted <= k:
            raise RuntimeError(
                f"the model runner returned {num_sampled} tokens for request {request.request_id!r}, "
                f"which was scheduled with {k} draft tokens (1 to {k + 1} expected)"
            )
        request.num_computed_tokens -= k - accepted
        request.num_draft_tokens += k
        request.num_accepted_tokens += accepted
        for per_position, n in ((request.drafted_per_position, k), (request.accepted_per_position, accepted)):
            per_position.extend([0] * (k - len(per_position)))
            for i in range(n):
                per_position[i] += 1
        self._spec_drafts += k
        self._spec_accepted += accepted
        drafted = self._spec_drafted_per_position
        drafted.extend([0] * (k - len(drafted)))
        for i in range(k):
            drafted[i] += 1
        per_position = self._spec_accepted_per_position
        per_position.extend([0] * (accepted - len(per_position)))
        for i in range(accepted):
            per_position[i] += 1

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        placeholders = request.num_output_placeholders
        num_tokens = len(request.all_token_ids)
        if placeholders and (
            not self.pending_tokens
            or len(request.output_token_ids) + placeholders >= request.max_tokens
            or num_tokens + placeholders >= self._max_len
        ):
            return 0  # it waits for the token in flight (no pending tokens), or that token is its last
        num_new = num_tokens + placeholders - request.num_computed_tokens
        if num_new == 1 and request.draft_token_ids and not placeholders:
            # A decode with drafts: verify them in the same row. Never draft past max_tokens
            # or the length limit (those tokens could not be kept), nor past the budget.
            room = min(request.max_tokens - request.num_output_tokens, self._max_len - request.num_tokens) - 1
            del request.draft_token_ids[max(0, min(room, budget - 1)) :]
            return 1 + len(request.draft_token_ids)
        if self.long_prefill_token_threshold:
            num_new = min(num_new, self.long_prefill_token_threshold)
        return min(num_new, budget)

    def _choose_victim(self) -> Request:
        """The running request to preempt: the newest (fcfs) or the least urgent (priority)."""
        if self.policy == "priority":
            # Larger priority value = less urgent; ties go to the later arrival, then the later admission.
            return max(reversed(self.running), key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and requeue it at the front; it keeps its tokens and recomputes them."""
        self.kv_cache.free(request)
        self._sent_blocks.pop(request.request_id, None)  # resumed with a new table, sent whole
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.draft_token_ids = []
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.prepend(request)
        if self._num_preemptions == 1:  # once: it is normal under load, but worth knowing
            logger.warning(
                "KV cache full: preempted request %s (%d tokens); it will be recomputed later. Frequent "
                "preemption slows generation: give the KV cache more memory or lower max_num_seqs.",
                request.request_id,
                request.num_tokens,
            )
        else:
            logger.debug("preempted %s (%d tokens): KV cache full", request.request_id, request.num_tokens)

    def _make_scheduled(
        self, request: Request, num_new: int, new_block_ids: list[int], sent_before: bool
    ) -> ScheduledRequest:
        """The runner's view of the request's step, then its progress advanced by ``num_new`` tokens.

        ``new_block_ids``: its block-table delta; ``sent_before``: False when that is its whole table.
        Called once per scheduled request per step (256 times a decode step at batch 256): it keeps
        attribute reads to one each.
        """
        start = request.num_computed_tokens
        num_tokens = len(request.all_token_ids)
        placeholders = request.num_output_placeholders
        end = start + num_new  # == num_computed_tokens after this step
        num_drafts = end - num_tokens - placeholders
        if num_drafts > 0:
            token_ids = request.all_token_ids[start : end - num_drafts]
            draft_token_ids = request.draft_token_ids[:num_drafts]
        else:
            num_drafts = 0
            token_ids = request.all_token_ids[start:end]
            draft_token_ids = []
        num_pending = num_new - num_drafts - len(token_ids)  # trailing tokens still in flight (0 unless async)
        if num_pending:
            token_ids.extend([0] * num_pending)
        if draft_token_ids:
            token_ids.extend(draft_token_ids)
        pooling = request.pooling_params
        samples = end - num_drafts == num_tokens + placeholders
        # Positional arguments (in _SCHEDULED_FIELDS order, checked at import): keywords cost twice as much.
        scheduled = ScheduledRequest(
            request.request_id,
            token_ids,
            start,
            new_block_ids,
            samples and pooling is None,
            request.sampling_params,
            request.prompt_token_ids,
            request.output_token_ids,
            num_pending,
            placeholders,
            not sent_before,
            draft_token_ids,
            pooling,
            request.lora_request,
        )
        # Advance the request: its tokens count as computed once handed to the runner.
        request.num_computed_tokens = end
        request.num_scheduled_drafts = num_drafts
        if request.draft_token_ids:
            request.draft_token_ids = []  # consumed (or stale once this step's tokens land)
        if samples:
            request.num_output_placeholders = placeholders + 1  # this step samples its next token
        return scheduled

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """Token-level stop rules for the token just appended; sets status and stop_reason."""
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        # min_tokens: at least that many tokens come *before* a stop token (vLLM's
        # sampler masks EOS / stop ids until then; this also holds for runners that don't).
        if num_output > params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if params.stop_token_ids and token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
        if num_output >= request.max_tokens or len(request.all_token_ids) >= self._max_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _release(self, request: Request) -> None:
        """Free a finished request's blocks and forget it."""
        self.kv_cache.free(request)
        self._sent_blocks.pop(request.request_id, None)
        request.num_output_placeholders = 0  # a token still in flight for it will be dropped
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
