"""Scheduler unit tests: chunking, ordering, preemption, stop rules, aborts, validation."""

from __future__ import annotations

from typing import Any

import pytest
from kvik.request import Request, RequestStatus
from kvik.scheduling.kv_cache_manager import max_blocks_per_request
from kvik.scheduling.output import RunnerOutput, SchedulerOutput
from kvik.scheduling.scheduler import Scheduler
from sched_harness import FakeRunner, check_invariants, make_request, reference_generate


def _sched(**kw: Any) -> Scheduler:
    args: dict[str, Any] = dict(
        num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128
    )
    args.update(kw)
    return Scheduler(**args)


def _step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    check_invariants(sched)
    return out


def _plan(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(r.request_id, r.start_pos, r.num_new_tokens, r.sample) for r in out.scheduled]


def _manual_step(sched: Scheduler, tokens: dict[str, list[int]]) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    return out, sched.update_from_output(out, RunnerOutput(tokens))


def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched = _sched(max_num_batched_tokens=4)
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", list(range(2, 12)), eos=frozenset()))  # 10 tokens
    plans = [_plan(_step(sched, runner)) for _ in range(4)]
    assert plans == [[("a", 0, 4, False)], [("a", 4, 4, False)], [("a", 8, 2, True)], [("a", 10, 1, True)]]


def test_long_prefill_threshold_caps_each_request() -> None:
    sched = _sched(long_prefill_token_threshold=3)
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", list(range(2, 9)), eos=frozenset()))
    sched.add_request(make_request("b", list(range(20, 22)), eos=frozenset()))
    assert _plan(_step(sched, runner)) == [("a", 0, 3, False), ("b", 0, 2, True)]
    assert _plan(_step(sched, runner)) == [("a", 3, 3, False), ("b", 2, 1, True)]


def test_decodes_first_then_waiting_prefills_fill_the_budget() -> None:
    sched = _sched(max_num_batched_tokens=6)
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", [5, 6, 7, 8], eos=frozenset()))
    _step(sched, runner)
    sched.add_request(make_request("b", list(range(20, 30)), eos=frozenset()))
    assert _plan(_step(sched, runner)) == [("a", 4, 1, True), ("b", 0, 5, False)]


def test_without_chunking_a_prompt_waits_for_a_step_with_room() -> None:
    sched = _sched(max_num_batched_tokens=8, enable_chunked_prefill=False)
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", [2, 3, 4, 5, 6], eos=frozenset()))
    sched.add_request(make_request("b", [7, 8, 9, 10, 11], eos=frozenset()))
    assert _plan(_step(sched, runner)) == [("a", 0, 5, True)]
    assert _plan(_step(sched, runner)) == [("a", 5, 1, True), ("b", 0, 5, True)]


def test_max_num_seqs_limits_the_batch() -> None:
    sched = _sched(max_num_seqs=2)
    runner = FakeRunner(sched)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", [2 + i, 3], eos=frozenset()))
    out = _step(sched, runner)
    assert [r.request_id for r in out.scheduled] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 1


def test_same_step_admissions_share_a_prefix() -> None:
    sched = _sched()
    runner = FakeRunner(sched)
    prompt = list(range(2, 11))  # 9 tokens: 2 full blocks
    for name in ("a", "b", "c"):  # e.g. the n=3 samples of one prompt
        sched.add_request(make_request(name, prompt, eos=frozenset()))
    out = _step(sched, runner)
    assert _plan(out) == [("a", 0, 9, True), ("b", 8, 1, True), ("c", 8, 1, True)]
    ids = [sched.kv_cache.get_block_ids(sched.requests[x])[:2] for x in "abc"]
    assert ids[0] == ids[1] == ids[2]
    assert [b.ref_cnt for b in sched.kv_cache.get_blocks("a")[:2]] == [3, 3]


def test_prefix_hits_count_as_computed_and_share_blocks() -> None:
    sched = _sched()
    runner = FakeRunner(sched)
    prompt = list(range(2, 11))  # 9 tokens: 2 full blocks
    sched.add_request(make_request("a", prompt, eos=frozenset()))
    _step(sched, runner)
    b = make_request("b", prompt, eos=frozenset())
    sched.add_request(b)
    out = _step(sched, runner)
    assert ("b", 8, 1, True) in _plan(out)
    assert b.num_cached_tokens == 8
    assert sched.kv_cache.get_block_ids(b)[:2] == sched.kv_cache.get_block_ids(sched.requests["a"])[:2]
    stats = sched.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (18, 8)
    assert runner.kv  # the fake runner read b's context through the shared blocks and found a's tokens


@pytest.mark.parametrize(("policy", "victim"), [("fcfs", "a"), ("priority", "b")])
def test_preemption_victim_by_policy(policy: str, victim: str) -> None:
    # 4 usable blocks of 4 tokens. b (less urgent) is admitted first; a fills the pool.
    sched = _sched(num_blocks=5, max_model_len=16, policy=policy)
    runner = FakeRunner(sched)
    b = make_request("b", [2, 3, 4, 5], max_tokens=12, priority=1, arrival_time=0.0, eos=frozenset())
    a = make_request("a", [6, 7, 8, 9, 10, 11], max_tokens=10, priority=0, arrival_time=1.0, eos=frozenset())
    sched.add_request(b)
    _step(sched, runner)
    sched.add_request(a)
    for _ in range(3):
        out = _step(sched, runner)
        assert not out.preempted_request_ids
    assert sched.kv_cache.num_free_blocks == 0
    # Next step a needs a 3rd block. fcfs: a is the newest, it preempts itself.
    # priority: b (priority 1) is preempted even though it was already scheduled this step.
    out = _step(sched, runner)
    assert out.preempted_request_ids == [victim]
    assert [r.request_id for r in out.scheduled] == [x for x in ("b", "a") if x != victim]
    preempted = {"a": a, "b": b}[victim]
    assert preempted.status == RequestStatus.PREEMPTED and preempted.num_computed_tokens == 0
    assert preempted.num_preemptions == 1 and sched.get_stats().num_preemptions == 1
    assert next(iter(sched.waiting)) is preempted
    while sched.has_unfinished_requests():
        _step(sched, runner)
    for r in (a, b):  # recomputation after preemption changes nothing
        fresh = make_request("ref", r.prompt_token_ids, r.max_tokens, eos=frozenset())
        assert (r.output_token_ids, r.status) == reference_generate(fresh, 16)


def test_priority_policy_admits_urgent_requests_first() -> None:
    sched = _sched(policy="priority", max_num_seqs=1)
    for i, prio in enumerate([2, 0, 1]):
        sched.add_request(make_request(f"p{prio}", [2, 3], priority=prio, arrival_time=float(i)))
    assert [r.request_id for r in sched.schedule().scheduled] == ["p0"]


def test_eos_stop_token_and_length_rules() -> None:
    sched = _sched(max_model_len=8)
    reqs = [
        make_request("eos", [2, 3], eos=frozenset({1})),
        make_request("ignore", [2, 3], max_tokens=3, eos=frozenset({1}), ignore_eos=True),
        make_request("min", [2, 3], eos=frozenset({1}), min_tokens=2),
        make_request("stop", [2, 3], stop_token_ids=[7]),
        make_request("maxlen", [2, 3, 4, 5, 6], max_tokens=100),
    ]
    for r in reqs:
        sched.add_request(r)
    r = {x.request_id: x for x in reqs}
    _, updated = _manual_step(sched, {"eos": [1], "ignore": [1], "min": [1], "stop": [7], "maxlen": [9]})
    assert {x.request_id for x in updated} == set(r)
    assert r["eos"].status == RequestStatus.FINISHED_STOPPED and r["eos"].stop_reason is None
    assert r["eos"].output_token_ids == [1]
    assert r["stop"].status == RequestStatus.FINISHED_STOPPED and r["stop"].stop_reason == 7
    assert r["ignore"].status == r["min"].status == r["maxlen"].status == RequestStatus.RUNNING
    out, _ = _manual_step(sched, {"ignore": [1], "min": [1], "maxlen": [9]})
    assert sorted(out.finished_request_ids) == ["eos", "stop"]
    assert r["min"].status == RequestStatus.RUNNING  # EOS as 2nd token: min_tokens=2 not reached yet
    assert r["maxlen"].status == RequestStatus.RUNNING  # 7 tokens < max_model_len 8
    out, _ = _manual_step(sched, {"ignore": [1], "min": [1], "maxlen": [9]})
    assert r["min"].status == RequestStatus.FINISHED_STOPPED and r["min"].output_token_ids == [1, 1, 1]
    assert r["ignore"].status == RequestStatus.FINISHED_LENGTH and r["ignore"].num_output_tokens == 3
    assert r["maxlen"].status == RequestStatus.FINISHED_LENGTH and r["maxlen"].num_tokens == 8
    assert not out.finished_request_ids  # reported once, in the next step's output
    assert not sched.has_unfinished_requests() and sched.kv_cache.usage == 0.0


def test_tokens_after_a_stop_are_dropped() -> None:
    sched = _sched()
    a = make_request("a", [2, 3], stop_token_ids=[5])
    sched.add_request(a)
    _manual_step(sched, {"a": [4, 5, 6]})  # e.g. speculative tokens past a stop
    assert a.output_token_ids == [4, 5] and a.status == RequestStatus.FINISHED_STOPPED


def test_sequences_stop_at_kv_capacity_when_max_model_len_is_larger() -> None:
    sched = _sched(num_blocks=3, block_size=4, max_model_len=100)  # 8 tokens of KV
    runner = FakeRunner(sched)
    a = make_request("a", [2, 3, 4, 5, 6], max_tokens=50, eos=frozenset())
    sched.add_request(a)
    while sched.has_unfinished_requests():
        _step(sched, runner)
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_tokens == 8


def test_finish_requests_aborts_waiting_and_running() -> None:
    sched = _sched(max_num_seqs=1)
    runner = FakeRunner(sched)
    a, b = make_request("a", [2, 3, 4]), make_request("b", [5, 6])
    sched.add_request(a)
    sched.add_request(b)
    _step(sched, runner)
    assert sched.kv_cache.usage > 0
    sched.finish_requests(["a", "b", "nope"], RequestStatus.FINISHED_ABORTED)
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # already finished: ignored
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv_cache.usage == 0.0 and not sched.has_unfinished_requests()
    sched.add_request(make_request("c", [7]))
    assert sorted(sched.schedule().finished_request_ids) == ["a", "b"]
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests("c", RequestStatus.RUNNING)


def test_abort_between_schedule_and_update_is_ignored_by_update() -> None:
    sched = _sched()
    a = make_request("a", [2, 3, 4])
    sched.add_request(a)
    out = sched.schedule()
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, RunnerOutput({"a": [9]})) == []
    assert a.output_token_ids == [] and sched.kv_cache.usage == 0.0


@pytest.mark.parametrize(
    ("prompt", "kwargs", "match"),
    [
        ([], {}, "empty prompt"),
        (list(range(16)), {"max_model_len": 16}, "16 tokens but max_model_len is 16"),
        (list(range(20)), {"num_blocks": 5}, "needs 5 KV blocks .* only 4 blocks"),
        (list(range(20)), {"enable_chunked_prefill": False, "max_num_batched_tokens": 16}, "chunked prefill is off"),
    ],
)
def test_add_request_validation(prompt: list[int], kwargs: dict[str, Any], match: str) -> None:
    sched = _sched(**kwargs)
    with pytest.raises(ValueError, match=match):
        sched.add_request(make_request("x", prompt))
    assert not sched.has_unfinished_requests()


def test_duplicate_live_request_id_is_rejected() -> None:
    sched = _sched()
    sched.add_request(make_request("x", [2]))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("x", [3]))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        _sched(max_num_seqs=0)
    with pytest.raises(ValueError, match="scheduling policy"):
        _sched(policy="random")


def test_stats_snapshot() -> None:
    sched = _sched()
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", [2, 3, 4, 5, 6], max_tokens=3, eos=frozenset()))
    _step(sched, runner)
    stats = sched.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_steps) == (1, 0, 1)
    assert stats.kv_cache_usage == pytest.approx(2 / 63)
    assert stats.prefix_cache_hit_rate == 0.0


def test_a_runner_that_drops_a_sample_fails_loudly() -> None:
    sched = _sched()
    sched.add_request(make_request("a", [2, 3]))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="no sampled token for request 'a'"):
        sched.update_from_output(out, RunnerOutput({}))


def test_an_unscheduled_victim_publishes_no_unwritten_blocks() -> None:
    # Priority policy: b (less urgent) is scheduled first in step 3, filling its 2nd block,
    # then a needs a block and b is preempted and un-scheduled. That block's KV was
    # never written, so it must not be in the prefix cache when b resumes.
    sched = _sched(num_blocks=5, policy="priority", long_prefill_token_threshold=3)
    runner = FakeRunner(sched)
    b = make_request("b", list(range(2, 14)), max_tokens=2, priority=1, arrival_time=0.0, eos=frozenset())
    a = make_request("a", [30, 31, 32, 33, 34], max_tokens=2, priority=0, arrival_time=1.0, eos=frozenset())
    sched.add_request(b)
    _step(sched, runner)
    sched.add_request(a)
    _step(sched, runner)
    out = _step(sched, runner)
    assert out.preempted_request_ids == ["b"] and _plan(out) == [("a", 3, 2, True)]
    while sched.has_unfinished_requests():
        _step(sched, runner)
    for r in (a, b):
        fresh = make_request("ref", r.prompt_token_ids, r.max_tokens, eos=frozenset())
        assert (r.output_token_ids, r.status) == reference_generate(fresh, 16)


def test_pipeline_micro_batches_hold_disjoint_requests_and_alternate() -> None:
    """pending_tokens=False, micro_batches=2 (pipeline parallelism): a request whose token is in flight is not
    scheduled again, and running requests split into two groups, each in its own step in flight."""
    sched = _sched(pending_tokens=False, micro_batches=2)
    runner = FakeRunner(sched)
    for name in "abcd":
        sched.add_request(make_request(name, [5, 6, 7], eos=frozenset()))
    _step(sched, runner)  # the four prefills (waiting admissions are not split)
    first = sched.schedule()  # two decodes ...
    second = sched.schedule()  # ... the other two, while the first step is in flight
    assert [r.request_id for r in first.scheduled] == ["a", "b"]
    assert [r.request_id for r in second.scheduled] == ["c", "d"]
    assert all(r.num_pending_tokens == 0 for r in [*first.scheduled, *second.scheduled])
    assert sched.schedule().is_empty  # everything is in flight
    sched.update_from_output(first, runner.execute(first))
    assert [r.request_id for r in sched.schedule().scheduled] == ["a", "b"]  # back as soon as its tokens land


def test_a_sliding_window_releases_the_blocks_it_has_passed() -> None:
    """Every layer slides with window 6 (blocks of 2): a 40-token request holds at most the window's blocks
    plus margin at any step, the runner gets only the blocks appended (never the whole table again: the
    released ids it keeps are read masked, if at all), and the tokens are the reference's."""
    sched = Scheduler(num_blocks=64, block_size=2, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=64,
                      group_windows=(6,))  # fmt: skip
    request = make_request("a", list(range(2, 26)), max_tokens=16, ignore_eos=True)
    sched.add_request(request)
    runner = FakeRunner(sched)
    held, resent = [], 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        resent += sum(1 for sr in out.scheduled if sr.full_block_table and sr.start_pos > 0)
        sched.update_from_output(out, runner.execute(out))
        if sched.running:
            table = sched.kv_cache.get_blocks("a")
            held.append(sum(1 for b in table if b.block_id != 0))
            check_invariants(sched)
            runner.check_computed_kv()
    assert max(held) <= max_blocks_per_request(64, 2, 6, 8) == 8  # the window's, one of margin, a step's (8 tokens)
    assert resent == 0
    assert request.output_token_ids == reference_generate(request, 64)[0]
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.pool.num_usable_blocks


def test_with_every_layer_sliding_requests_outgrow_the_pool() -> None:
    """Window 6, blocks of 2, steps of 8 tokens: a request holds at most 8 blocks, so a pool of 9 usable blocks
    (18 tokens) takes 24-token prompts and runs them to max_model_len 64, not to a "length" stop at 18 tokens;
    two such requests preempt each other and still give the reference's tokens."""
    bound = max_blocks_per_request(64, 2, 6, 8)
    sched = Scheduler(num_blocks=1 + bound + 1, block_size=2, max_num_batched_tokens=8, max_num_seqs=2,
                      max_model_len=64, group_windows=(6,))  # fmt: skip
    requests = [make_request(name, list(range(k, k + 24)), max_tokens=100, ignore_eos=True) for name, k in
                (("a", 2), ("b", 40))]  # fmt: skip
    for request in requests:
        sched.add_request(request)
    runner = FakeRunner(sched)
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, runner.execute(out))
        for request in sched.running:
            assert sum(1 for b in sched.kv_cache.get_blocks(request.request_id) if b.block_id != 0) <= bound
        check_invariants(sched)
        runner.check_computed_kv()
    assert sched.get_stats().num_preemptions > 0
    for request in requests:
        assert request.num_tokens == 64 and request.status == RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == reference_generate(request, 64)[0]
    # Without the window the same pool refuses the prompt outright.
    plain = Scheduler(num_blocks=1 + bound + 1, block_size=2, max_num_batched_tokens=8, max_num_seqs=2,
                      max_model_len=64)  # fmt: skip
    with pytest.raises(ValueError, match="could never run"):
        plain.add_request(make_request("c", list(range(2, 26))))
