"""The steady decode step's whole-batch passes (kvik.scheduling.decode_batch) decide exactly what the
scheduler's per-request loops decide: the same workload through a scheduler with them and one without
gives, step by step, the same scheduled work, the same token updates and the same block tables."""

from __future__ import annotations

import dataclasses
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvik.request import Request, RequestStatus
from kvik.scheduling import decode_batch
from kvik.scheduling.kv_cache_manager import blocks_held_at_most
from kvik.scheduling.output import RunnerOutput, SchedulerOutput
from kvik.scheduling.scheduler import Scheduler
from sched_harness import RequestSpec, make_request, reference_generate, run_workload
from test_scheduler_properties import build, workloads


class RecordingScheduler(Scheduler):
    """Records every step's output and update; ``batched=False`` turns the whole-batch passes off."""

    def __init__(self, *args: object, batched: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.batched = batched
        self.trace: list[object] = []
        self.batched_steps = 0

    def _passes(self) -> mock._patch | _Counting:  # type: ignore[name-defined]
        if self.batched:
            return _Counting(self)
        return mock.patch("kvik.scheduling.scheduler.schedule_decodes", lambda *a: None)

    def schedule(self) -> SchedulerOutput:
        with self._passes():
            out = super().schedule()
        self.trace.append(("schedule", dataclasses.astuple(out), self._tables()))
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[Request]:
        updated = super().update_from_output(scheduler_output, runner_output)
        state = [(r.request_id, r.status, list(r.output_token_ids), r.num_output_placeholders) for r in updated]
        self.trace.append(("update", state, [r.request_id for r in self.running], self._tables()))
        return updated

    def _tables(self) -> dict[str, list[int]]:
        return {rid: list(ids) for rid, ids in self.kv_cache._block_ids.items()}


class _Counting:
    """Counts the steps the whole-batch pass scheduled."""

    def __init__(self, scheduler: RecordingScheduler) -> None:
        self.scheduler = scheduler
        self.patch = mock.patch("kvik.scheduling.scheduler.schedule_decodes", self._schedule)

    def _schedule(self, scheduler: Scheduler, budget: int) -> object:
        got = decode_batch.schedule_decodes(scheduler, budget)
        self.scheduler.batched_steps += got is not None
        return got

    def __enter__(self) -> None:
        self.patch.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.patch.__exit__(*exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=workloads(),
    pool_slack=st.integers(0, 12),
    budget=st.integers(1, 40),
    max_num_seqs=st.integers(1, 8),
    caching=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    overlap=st.booleans(),
)
def test_whole_batch_passes_decide_as_the_per_request_loops(
    workload, pool_slack, budget, max_num_seqs, caching, policy, overlap
) -> None:
    block_size, raws = workload
    max_model_len = max(len(r.prompt) for r in raws) + 12
    num_blocks = 1 + blocks_held_at_most(max_model_len, block_size, (None,), budget) + pool_slack
    traces, outputs = [], []
    for batched in (True, False):
        sched = RecordingScheduler(
            batched=batched,
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_prefix_caching=caching,
            policy=policy,
        )
        result = run_workload(sched, build(raws), overlap=overlap)
        traces.append(sched.trace)
        outputs.append(result.outputs)
    assert traces[0] == traces[1]
    assert outputs[0] == outputs[1]


def test_a_steady_decode_batch_takes_the_whole_batch_passes() -> None:
    """Many requests decoding side by side (async and not), stopping on a stop id or their length, some
    preempted for lack of blocks: the passes carry most steps, and every result equals the loops' and the
    reference continuation."""
    for overlap in (False, True):
        traces, batched_steps, preemptions = [], [], []
        for batched in (True, False):
            sched = RecordingScheduler(
                batched=batched, num_blocks=20, block_size=4, max_num_batched_tokens=64, max_num_seqs=16, max_model_len=40
            )
            specs = [
                RequestSpec(make_request(f"r{i}", [2 + i, 3 + i, 4, 5, 6], 6 + i % 11, stop_token_ids=[7] if i % 3 else []))
                for i in range(14)
            ]
            result = run_workload(sched, specs, overlap=overlap)
            for spec in specs:
                request = spec.request
                fresh = make_request("ref", request.prompt_token_ids, request.max_tokens, stop_token_ids=request.sampling_params.stop_token_ids)
                assert result.outputs[request.request_id] == reference_generate(fresh, 40)
            traces.append(sched.trace)
            batched_steps.append(sched.batched_steps)
            preemptions.append(result.num_preemptions)
        assert traces[0] == traces[1]
        assert batched_steps[0] >= 5 and batched_steps[1] == 0, batched_steps
        assert preemptions[0] == preemptions[1] > 0
        statuses = {status for _, status in result.outputs.values()}
        assert statuses == {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH}
