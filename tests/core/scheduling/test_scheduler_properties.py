"""Property tests: random workloads through the scheduler and the fake paged runner.

Scheduling may change *when* tokens are computed, never *which* tokens come
out: with a deterministic runner every completed request must produce exactly
the reference continuation, whatever the pool size (preemption or not), budget
(chunked prefill or not), prefix caching and policy. Block accounting is checked
after every step (see ``sched_harness.check_invariants``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvik.request import RequestStatus
from kvik.scheduling.kv_cache_manager import blocks_held_at_most, cdiv
from kvik.scheduling.scheduler import Scheduler
from sched_harness import RequestSpec, make_request, reference_generate, run_workload

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Raw:
    """A request as plain data, so every run builds fresh Request objects."""

    prompt: tuple[int, ...]
    max_tokens: int
    arrival_step: int
    priority: int
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    abort_step: int | None
    abort_mid_step: bool


@st.composite
def workloads(draw: st.DrawFn) -> tuple[int, list[Raw]]:
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    # A few shared prefixes (system prompts) so prefix-cache hits happen.
    prefixes = draw(st.lists(st.lists(st.integers(2, 47), max_size=20), min_size=1, max_size=3))
    raws = []
    for _ in range(draw(st.integers(1, 8))):
        prefix = draw(st.sampled_from(prefixes))
        suffix = draw(st.lists(st.integers(0, 47), min_size=0 if prefix else 1, max_size=10))
        max_tokens = draw(st.integers(1, 12))
        abort = draw(st.integers(0, 30)) if draw(st.integers(0, 2)) == 0 else None
        raws.append(
            Raw(
                prompt=tuple(prefix + suffix),
                max_tokens=max_tokens,
                arrival_step=draw(st.integers(0, 6)),
                priority=draw(st.integers(0, 2)),
                min_tokens=draw(st.integers(0, max_tokens)),
                ignore_eos=draw(st.booleans()),
                stop_token_ids=tuple(draw(st.lists(st.integers(0, 47), max_size=2))),
                abort_step=abort,
                abort_mid_step=draw(st.booleans()),
            )
        )
    return block_size, raws


def build(raws: list[Raw]) -> list[RequestSpec]:
    return [
        RequestSpec(
            make_request(
                f"r{i}",
                list(r.prompt),
                r.max_tokens,
                priority=r.priority,
                arrival_time=float(i),
                min_tokens=r.min_tokens,
                ignore_eos=r.ignore_eos,
                stop_token_ids=list(r.stop_token_ids),
            ),
            arrival_step=r.arrival_step,
            abort_step=r.abort_step,
            abort_mid_step=r.abort_mid_step,
        )
        for i, r in enumerate(raws)
    ]


def check_outputs(result_outputs: dict, specs: list[RequestSpec], max_len: int) -> None:
    for spec in specs:
        request = spec.request
        # A fresh copy of the request for the reference (the run mutated this one).
        fresh = make_request("ref", request.prompt_token_ids, request.max_tokens, **_params(request.sampling_params))
        want_tokens, want_status = reference_generate(fresh, max_len)
        got_tokens, got_status = result_outputs[request.request_id]
        if got_status == RequestStatus.FINISHED_ABORTED:
            assert spec.abort_step is not None
            assert got_tokens == want_tokens[: len(got_tokens)]
        else:
            assert (got_tokens, got_status) == (want_tokens, want_status), request.request_id


def _params(sp) -> dict:
    return {"min_tokens": sp.min_tokens, "ignore_eos": sp.ignore_eos, "stop_token_ids": sp.stop_token_ids}


@SETTINGS
@given(
    workload=workloads(),
    pool_slack=st.integers(0, 12),
    extra_len=st.integers(1, 16),
    budget=st.integers(1, 40),
    max_num_seqs=st.integers(1, 6),
    caching=st.booleans(),
    chunked=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    threshold=st.sampled_from([0, 0, 3]),
    resets=st.frozensets(st.integers(0, 20), max_size=2),
    overlap=st.booleans(),
    windows=st.sampled_from([(None,), (None,), (2,), (5,), (13,), (None, 3), (None, 5, 5), (None, None, 2)]),
)
def test_random_workloads_produce_reference_tokens(
    workload, pool_slack, extra_len, budget, max_num_seqs, caching, chunked, policy, threshold, resets, overlap, windows
) -> None:
    """``overlap``: async scheduling (step n+1 scheduled and run before step n's update). ``windows``: one per
    KV-cache group; a group whose layers slide releases the blocks behind its window (the fake runner then reads
    only what each group's window shows), and mixed windows keep one block table per group (Gemma's layers)."""
    block_size, raws = workload
    longest = max(len(r.prompt) for r in raws)
    max_model_len = longest + extra_len
    if not chunked:
        budget = max(budget, longest)
    # Just enough blocks for one longest sequence, plus slack: small pools force preemption. With a window a
    # request holds only the window's blocks and a step's, so the pool may be smaller than one sequence.
    num_blocks = 1 + blocks_held_at_most(max_model_len, block_size, windows, budget) + pool_slack
    sched = Scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_prefix_caching=caching,
        enable_chunked_prefill=chunked,
        policy=policy,
        long_prefill_token_threshold=threshold,
        group_windows=windows,
    )
    specs = build(raws)
    result = run_workload(sched, specs, reset_cache_steps=resets, overlap=overlap)
    check_outputs(result.outputs, specs, max_model_len)
    if not caching:
        assert result.prefix_hits == 0


@SETTINGS
@given(workload=workloads(), budget=st.integers(1, 24), overlap=st.booleans())
def test_tight_pool_with_sharing_matches_roomy_pool(workload, budget, overlap) -> None:
    """The same workload on a minimal pool (preempting) and a roomy one gives identical results."""
    block_size, raws = workload
    raws = [Raw(**{**r.__dict__, "abort_step": None}) for r in raws]
    max_model_len = max(len(r.prompt) for r in raws) + 12
    results = []
    for num_blocks in (1 + cdiv(max_model_len, block_size), 1 + 8 * cdiv(max_model_len, block_size)):
        sched = Scheduler(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_batched_tokens=budget,
            max_num_seqs=8,
            max_model_len=max_model_len,
        )
        results.append(run_workload(sched, build(raws), overlap=overlap).outputs)
    assert results[0] == results[1]
