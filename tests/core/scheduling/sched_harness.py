"""A fake model runner with a fake paged KV cache, a reference generator and invariant checks.

The fake runner really uses the block tables: it writes each scheduled token
(and its position) into a slot-indexed dict standing in for the KV cache, and
when asked to sample it reads the whole context back *through the block table*
and checks it against the request's true tokens. The sampled token is a pure
function of that context (:func:`next_token`). So a wrong prefix-cache hit, a
block shared while being written, or a block freed too early changes the tokens
produced, and comparing with :func:`reference_generate` catches it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kvik.request import Request, RequestStatus
from kvik.sampling_params import SamplingParams
from kvik.scheduling.block_pool import NULL_BLOCK_ID
from kvik.scheduling.kv_cache_manager import group_hash
from kvik.scheduling.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from kvik.scheduling.scheduler import Scheduler
from kvik.worker.kit.block_tables import BlockTables

VOCAB = 48
EOS = 1


def next_token(context: list[int]) -> int:
    """Deterministic 'model': a rolling hash of the whole context."""
    h = 17
    for t in context:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
    return h % VOCAB


def make_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 8,
    *,
    priority: int = 0,
    arrival_time: float = 0.0,
    eos: frozenset[int] = frozenset({EOS}),
    **params: object,
) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return Request(
        request_id,
        list(prompt),
        sp,
        max_tokens=max_tokens,
        eos_token_ids=eos,
        priority=priority,
        arrival_time=arrival_time,
    )


def reference_generate(request: Request, max_len: int) -> tuple[list[int], RequestStatus]:
    """What any correct scheduler must produce for ``request`` with the fake model."""
    sp = request.sampling_params
    tokens = list(request.prompt_token_ids)
    out: list[int] = []
    while True:
        t = next_token(tokens)
        tokens.append(t)
        out.append(t)
        if len(out) > sp.min_tokens and ((not sp.ignore_eos and t in request.eos_token_ids) or t in sp.stop_token_ids):
            return out, RequestStatus.FINISHED_STOPPED
        if len(out) >= request.max_tokens or len(tokens) >= max_len:
            return out, RequestStatus.FINISHED_LENGTH


def same_table(runner_ids: list[int], scheduler_ids: list[int]) -> bool:
    """The runner's row equals the scheduler's table, except where the scheduler released a block behind a
    window (null there): the runner is not told, and keeps the old id, which no unmasked query reads."""
    return len(runner_ids) == len(scheduler_ids) and all(
        r == s for r, s in zip(runner_ids, scheduler_ids, strict=True) if s != NULL_BLOCK_ID
    )


@dataclass
class FakeRunner:
    scheduler: Scheduler
    # slot (block_id * block_size + offset) -> (token id, position) written there
    kv: dict[int, tuple[int, int]] = field(default_factory=dict)
    strict: bool = True  # check every scheduled request against the scheduler's live state
    # Async scheduling: the previous execute()'s samples, not yet applied by update_from_output.
    last_sampled: dict[str, int] = field(default_factory=dict)
    # The block tables as a real runner keeps them: rebuilt from the scheduler's deltas.
    tables: BlockTables = field(default_factory=lambda: BlockTables(rows=1, cols=1))

    def __post_init__(self) -> None:
        self.tables.num_groups = self.scheduler.kv_cache.num_groups

    def slot(self, block_ids: list[int], pos: int, group: int = 0) -> int:
        """Where ``pos`` sits in ``group``'s table (the table holds every group's ids, interleaved)."""
        bs, num_groups = self.scheduler.block_size, self.scheduler.kv_cache.num_groups
        block_id = block_ids[(pos // bs) * num_groups + group]
        assert block_id != NULL_BLOCK_ID, "a block table holds the null block"
        return block_id * bs + pos % bs

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Write every scheduled token's KV, then read contexts back (like a real runner's layers)."""
        sched = self.scheduler
        kv_manager = sched.kv_cache
        assert out.num_batched_tokens == sum(r.num_new_tokens for r in out.scheduled)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs
        assert len({r.request_id for r in out.scheduled}) == len(out.scheduled)
        self.tables.apply(out)
        table_of = {sr.request_id: self.tables.block_ids(sr.request_id) for sr in out.scheduled}
        written: set[int] = set()
        true_of: dict[str, list[int]] = {}
        for sr in out.scheduled:
            request = sched.requests.get(sr.request_id)
            alive = request is not None and request.status == RequestStatus.RUNNING
            true_tokens = true_of[sr.request_id] = self.true_tokens(sr)
            end = sr.start_pos + sr.num_new_tokens
            assert sr.num_new_tokens >= 1
            assert sr.num_pending_tokens <= sr.num_pending_outputs <= 1
            known = sr.num_new_tokens - sr.num_pending_tokens
            assert sr.token_ids[:known] == true_tokens[sr.start_pos : sr.start_pos + known]
            tokens = true_tokens[sr.start_pos : end]  # the runner fills pending ones from its last samples
            assert sr.sample == (end == len(true_tokens))
            block_ids = table_of[sr.request_id]
            if request is not None and sr.request_id in kv_manager.block_tables:
                assert same_table(block_ids, kv_manager.get_block_ids(request)), "delta-built table != scheduler's"
            num_groups = kv_manager.num_groups
            assert len(block_ids) // num_groups * sched.block_size >= end
            for k, token in enumerate(tokens):
                pos = sr.start_pos + k
                for g in range(num_groups):  # each group's layers write the token in the group's own block
                    slot = self.slot(block_ids, pos, g)
                    assert slot not in written, "two requests (or groups) write the same KV slot in one step"
                    written.add(slot)
                    if alive and self.strict:
                        # A written block is the writer's; if it is already published in the
                        # prefix cache, it is under the writer's own hash for that position.
                        index = pos // sched.block_size
                        block = kv_manager.pool.blocks[block_ids[index * num_groups + g]]
                        assert block in kv_manager.get_blocks(sr.request_id)
                        if block.block_hash is not None:
                            assert block.block_hash == group_hash(kv_manager.block_hashes(request)[index], g)
                    self.kv[slot] = (token, pos)
        sampled: dict[str, list[int]] = {}
        for sr in out.scheduled:
            if sr.sample:
                end = sr.start_pos + sr.num_new_tokens
                true_tokens = true_of[sr.request_id]
                for g in range(kv_manager.num_groups):
                    first = self.first_visible(sr.start_pos, g)  # what the step's first query can see
                    context = [self.kv.get(self.slot(table_of[sr.request_id], p, g)) for p in range(first, end)]
                    want = [(t, p) for p, t in enumerate(true_tokens[:end])][first:]
                    assert context == want, f"bad KV for {sr.request_id} in group {g}"
                sampled[sr.request_id] = [next_token(true_tokens[:end])]
        self.last_sampled = {rid: tokens[0] for rid, tokens in sampled.items()}
        return RunnerOutput(sampled_token_ids=sampled)

    def first_visible(self, pos: int, group: int = 0) -> int:
        """The first key position a query at ``pos`` attends to in ``group`` (all of them without a window)."""
        window = self.scheduler.group_windows[group]
        return 0 if window is None else max(0, pos - window + 1)

    def true_tokens(self, sr: ScheduledRequest) -> list[int]:
        """The request's tokens, with the one the previous step sampled (async: not yet appended)."""
        tokens = sr.prompt_token_ids + sr.output_token_ids
        if sr.num_pending_outputs:
            assert sr.request_id in self.last_sampled, "a pending output the previous step did not sample"
            tokens.append(self.last_sampled[sr.request_id])
        return tokens

    def check_computed_kv(self) -> None:
        """Every computed token of every running request is in the fake KV at its slot, and the
        runner's delta-built table of every running request equals the scheduler's."""
        sched = self.scheduler
        for request in sched.running:
            block_ids = sched.kv_cache.get_block_ids(request)
            assert same_table(self.tables.block_ids(request.request_id), block_ids), request.request_id
            # (A sliding window: the tokens its next query can still see.)
            for g in range(sched.kv_cache.num_groups):
                for p in range(self.first_visible(request.num_computed_tokens, g), request.num_computed_tokens):
                    got = self.kv.get(self.slot(block_ids, p, g))
                    assert got == (request.all_token_ids[p], p), (request.request_id, p, g)


def check_invariants(sched: Scheduler) -> None:
    """Block ownership, ref counts, free queue, cache map and queue states are consistent."""
    kv = sched.kv_cache
    pool = kv.pool
    tables = kv.block_tables
    running_ids = {r.request_id for r in sched.running}
    waiting_ids = {r.request_id for r in sched.waiting}
    assert len(running_ids) == len(sched.running) and len(waiting_ids) == len(sched.waiting)
    assert not running_ids & waiting_ids
    assert running_ids | waiting_ids == set(sched.requests)
    assert set(tables) <= running_ids, "a request that is not running holds blocks"
    assert len(sched.running) <= sched.max_num_seqs

    holders: Counter[int] = Counter()
    num_groups = kv.num_groups
    for request_id, table in tables.items():
        assert len(table) % num_groups == 0, f"{request_id}'s table is not whole positions"
        held: list[int] = []
        for g, window in enumerate(sched.group_windows):
            ids = [b.block_id for b in table[g::num_groups]]
            if window is not None:  # blocks behind the window are released: null, at the head only
                released = next((i for i, b in enumerate(ids) if b != NULL_BLOCK_ID), len(ids))
                ids = ids[released:]
            assert NULL_BLOCK_ID not in ids
            held += ids
        assert len(held) == len(set(held)), f"{request_id} holds a block twice"
        holders.update(held)
    assert pool.null_block.ref_cnt == 1 and not pool.is_free(pool.null_block)
    num_hashed = 0
    for block in pool.blocks[1:]:
        assert block.ref_cnt == holders[block.block_id], block
        assert pool.is_free(block) == (block.ref_cnt == 0), block
        if block.block_hash is not None:
            num_hashed += 1
            assert pool.get_cached_block(block.block_hash) is block
    assert num_hashed == pool.num_cached_blocks
    num_in_use = sum(1 for b in pool.blocks[1:] if b.ref_cnt > 0)
    assert pool.num_free_blocks + num_in_use == pool.num_usable_blocks
    assert len(holders) == num_in_use  # blocks held by requests == blocks the pool counts as used
    assert len(set(pool.free_block_ids())) == pool.num_free_blocks

    # A block is shared only through the prefix cache: every holder has it at the
    # same table index, over identical token prefixes (equal chained hashes).
    positions: dict[int, set[tuple[int, bytes]]] = {}
    for request in sched.running:
        hashes = kv.block_hashes(request)
        for i, block in enumerate(tables.get(request.request_id, [])):
            if block.block_id != NULL_BLOCK_ID and block.ref_cnt > 1:
                assert i // num_groups < len(hashes), "a shared block is not full"
                positions.setdefault(block.block_id, set()).add((i, hashes[i // num_groups]))
    assert all(len(p) == 1 for p in positions.values()), "a block is shared by different prefixes"

    for request in sched.running:
        assert request.status == RequestStatus.RUNNING
        table = tables.get(request.request_id, [])
        assert kv.get_block_ids(request) == [b.block_id for b in table]
        assert len(table) // num_groups * sched.block_size >= request.num_computed_tokens
        hashes = kv.block_hashes(request)
        for i, block in enumerate(table):
            if block.block_hash is not None:
                expected = group_hash(hashes[i // num_groups], i % num_groups)
                assert block.block_hash == expected, "a block's hash differs from the request's block hash"
    for request in sched.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.num_computed_tokens == 0


@dataclass
class RequestSpec:
    request: Request
    arrival_step: int = 0
    abort_step: int | None = None
    abort_mid_step: bool = False  # abort between schedule() and update_from_output()


@dataclass
class RunResult:
    outputs: dict[str, tuple[list[int], RequestStatus]]
    num_steps: int
    num_preemptions: int
    prefix_hits: int


def run_workload(
    sched: Scheduler,
    specs: list[RequestSpec],
    reset_cache_steps: frozenset[int] = frozenset(),
    max_steps: int = 5000,
    overlap: bool = False,
) -> RunResult:
    """Drive the scheduler with the fake runner, checking invariants after every step.

    ``overlap``: async scheduling, as the engine does it: each step is scheduled and
    executed before the previous step's ``update_from_output``.
    """
    runner = FakeRunner(sched)
    pending = sorted(specs, key=lambda s: s.arrival_step)
    requests = {s.request.request_id: s.request for s in specs}
    reported: list[str] = []
    in_flight: tuple[SchedulerOutput, RunnerOutput] | None = None
    step = 0
    while pending or sched.has_unfinished_requests() or in_flight is not None:
        assert step < max_steps, "the workload did not finish: a scheduling livelock or deadlock"
        while pending and pending[0].arrival_step <= step:
            sched.add_request(pending.pop(0).request)
        for spec in specs:
            if spec.abort_step == step and not spec.abort_mid_step:
                sched.finish_requests(spec.request.request_id, RequestStatus.FINISHED_ABORTED)
        if step in reset_cache_steps:
            sched.reset_prefix_cache()
        out = sched.schedule()
        reported += out.finished_request_ids
        if not out.is_empty:
            for spec in specs:
                if spec.abort_step == step and spec.abort_mid_step:
                    sched.finish_requests([spec.request.request_id], RequestStatus.FINISHED_ABORTED)
            launched: tuple[SchedulerOutput, RunnerOutput] | None = (out, runner.execute(out))
        else:
            launched = None
            assert in_flight is not None or not sched.running, "running requests but nothing scheduled"
        if not overlap:
            in_flight, launched = launched, None
        if in_flight is not None:
            updated = sched.update_from_output(*in_flight)
            assert len({r.request_id for r in updated}) == len(updated)
            for request in updated:
                assert request.request_id in in_flight[1].sampled_token_ids
        in_flight = launched
        check_invariants(sched)
        runner.check_computed_kv()
        step += 1
    assert len(reported) == len(set(reported)), "a finished id was reported twice"
    assert set(reported) <= set(requests)
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.pool.num_usable_blocks
    assert not sched.kv_cache.block_tables
    assert all(r.num_output_placeholders == 0 for r in requests.values())
    stats = sched.get_stats()
    outputs = {rid: (list(r.output_token_ids), r.status) for rid, r in requests.items()}
    return RunResult(outputs, step, stats.num_preemptions, stats.prefix_cache_hits)
