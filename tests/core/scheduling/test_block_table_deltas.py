"""Block-table deltas: tables a runner rebuilds from ``new_block_ids`` always equal the scheduler's.

``sched_harness.FakeRunner`` keeps its tables in the kit's :class:`BlockTables`, fed
only by the deltas, reads and writes its fake KV cache through them, and asserts
after every step that each running request's table equals the KV-cache manager's.
Here random runs (prefix caching, chunked prefill, preemption, aborts, async
overlap) additionally check that the deltas are deltas: after the first
(whole-table) send, a request is only ever sent blocks it did not have.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from kvik.sampling_params import SamplingParams
from kvik.scheduling.kv_cache_manager import cdiv
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.scheduling.scheduler import Scheduler
from kvik.worker.kit.block_tables import BlockTables
from sched_harness import run_workload
from test_scheduler_properties import SETTINGS, build, workloads


@SETTINGS
@given(
    workload=workloads(),
    pool_slack=st.integers(0, 6),
    budget=st.integers(1, 30),
    max_num_seqs=st.integers(1, 6),
    caching=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    overlap=st.booleans(),
)
def test_tables_rebuilt_from_deltas_equal_the_schedulers(
    workload, pool_slack, budget, max_num_seqs, caching, policy, overlap
) -> None:
    block_size, raws = workload
    max_model_len = max(len(r.prompt) for r in raws) + 10
    sched = Scheduler(
        num_blocks=1 + cdiv(max_model_len, block_size) + pool_slack,
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_prefix_caching=caching,
        policy=policy,
    )
    sent: dict[str, list[int]] = {}  # what a runner holds, by request, from the deltas alone
    schedule = sched.schedule

    def recording_schedule() -> SchedulerOutput:
        out = schedule()
        for rid in out.finished_request_ids + out.preempted_request_ids:
            sent.pop(rid, None)
        for sr in out.scheduled:
            if sr.full_block_table:
                sent[sr.request_id] = list(sr.new_block_ids)
            else:
                assert sr.request_id in sent, "a delta for a table the runner never got"
                assert not set(sr.new_block_ids) & set(sent[sr.request_id]), "a delta repeats a block"
                sent[sr.request_id] += sr.new_block_ids
            request = sched.requests.get(sr.request_id)
            if request is not None and sr.request_id in sched.kv_cache.block_tables:
                assert sent[sr.request_id] == sched.kv_cache.get_block_ids(request)
        return out

    sched.schedule = recording_schedule  # type: ignore[method-assign]
    run_workload(sched, build(raws), overlap=overlap)  # FakeRunner checks its BlockTables every step


def _req(rid: str, ids: list[int], full: bool) -> ScheduledRequest:
    return ScheduledRequest(rid, [0], 0, ids, True, SamplingParams(), full_block_table=full)


def test_block_tables_grow_replace_and_drop() -> None:
    tables = BlockTables(rows=1, cols=1)
    rows = tables.apply(SchedulerOutput([_req("a", [5, 6, 7], True), _req("b", [9], True)], 2))
    assert tables.table.shape[0] >= 2 and tables.table.shape[1] >= 3  # grew both ways
    assert tables.block_ids("a") == [5, 6, 7] and tables.block_ids("b") == [9]
    assert tables.table[rows[1], 1:].tolist() == [0] * (tables.table.shape[1] - 1)  # zero past the end
    tables.apply(SchedulerOutput([_req("a", [8], False), _req("b", [], False)], 2))
    assert tables.block_ids("a") == [5, 6, 7, 8] and tables.block_ids("b") == [9]
    # Preempted: dropped; resumed with a whole (shorter) table: replaced, tail zeroed.
    out = SchedulerOutput([_req("b", [3], False)], 1, preempted_request_ids=["a"])
    tables.apply(out)
    assert "a" not in tables and len(tables) == 1
    tables.apply(SchedulerOutput([_req("a", [4, 2], True)], 1))
    row = int(tables.apply(SchedulerOutput([_req("a", [], False)], 1))[0])
    assert tables.block_ids("a") == [4, 2]
    assert not np.any(tables.table[row, 2:])
    # A finished id reused by a new request in the same step: the old row goes first.
    tables.apply(SchedulerOutput([_req("b", [11], True)], 1, finished_request_ids=["b"]))
    assert tables.block_ids("b") == [11]
