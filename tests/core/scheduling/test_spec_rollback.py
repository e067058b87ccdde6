"""Property tests: speculative verify rows through the scheduler, with a fake paged runner.

Each step, decoding requests get drafts: the true continuation (the fake model is
deterministic) with random positions corrupted. The fake runner writes every
scheduled token's KV (drafts included) through the block tables, checks each
context it reads, and accepts drafts as a greedy verifier would. Whatever is
accepted or rejected, outputs equal the reference, the KV of every computed token
is right after each step (rejected drafts rolled back), blocks published to the
prefix cache hold only accepted tokens, and block accounting holds.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvik.request import RequestStatus
from kvik.scheduling.kv_cache_manager import blocks_held_at_most, longest_fitting_request
from kvik.scheduling.output import RunnerOutput, SchedulerOutput
from kvik.scheduling.scheduler import Scheduler
from sched_harness import FakeRunner, check_invariants, make_request, next_token, reference_generate


def _truth(tokens: list[int], k: int) -> list[int]:
    out = []
    for _ in range(k):
        out.append(next_token(tokens + out))
    return out


def _execute(runner: FakeRunner, out: SchedulerOutput) -> RunnerOutput:
    sched = runner.scheduler
    runner.tables.apply(out)
    sampled: dict[str, list[int]] = {}
    for sr in out.scheduled:
        block_ids = runner.tables.block_ids(sr.request_id)
        groups = range(sched.kv_cache.num_groups)
        for j, token in enumerate(sr.token_ids):
            for g in groups:  # each group's layers write the token in the group's own block
                runner.kv[runner.slot(block_ids, sr.start_pos + j, g)] = (token, sr.start_pos + j)
        if not sr.sample:
            continue
        k = len(sr.draft_token_ids)
        known = sr.prompt_token_ids + sr.output_token_ids
        end = sr.start_pos + sr.num_new_tokens - k  # the context of the first sampled position
        assert end == len(known) and sr.token_ids[len(sr.token_ids) - k :] == sr.draft_token_ids
        for g in groups:
            first = runner.first_visible(sr.start_pos, g)  # a sliding window: what the step's first query sees
            context = [runner.kv.get(runner.slot(block_ids, p, g)) for p in range(first, end)]
            assert context == [(t, p) for p, t in enumerate(known)][first:], f"bad KV for {sr.request_id}, {g}"
        tokens = []
        for j in range(k + 1):
            t = next_token(known + tokens)
            tokens.append(t)
            if j == k or sr.draft_token_ids[j] != t:
                break
        sampled[sr.request_id] = tokens
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    return RunnerOutput(sampled_token_ids=sampled)


def _check_cached_blocks_hold_known_tokens(runner: FakeRunner) -> None:
    sched = runner.scheduler
    bs, num_groups = sched.block_size, sched.kv_cache.num_groups
    for request in sched.running:
        for i, block in enumerate(sched.kv_cache.get_blocks(request.request_id)):
            if block.block_hash is None:
                continue
            position = i // num_groups
            for p in range(position * bs, (position + 1) * bs):
                assert p < request.num_computed_tokens, "a published block holds uncomputed (draft) positions"
                assert runner.kv[block.block_id * bs + p % bs] == (request.all_token_ids[p], p)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.sampled_from([1, 2, 4]),
    num_blocks=st.integers(6, 40),
    budget=st.integers(2, 24),
    k=st.integers(1, 5),
    prompts=st.lists(st.lists(st.integers(2, 47), min_size=1, max_size=14), min_size=1, max_size=5),
    max_tokens=st.lists(st.integers(1, 14), min_size=5, max_size=5),
    corrupt=st.lists(st.booleans(), min_size=64, max_size=64),
    prefix_caching=st.booleans(),
    windows=st.sampled_from([(None,), (None,), (2,), (5,), (None, 2), (None, 5, 5)]),
)
def test_verify_rows_roll_back_exactly(
    block_size, num_blocks, budget, k, prompts, max_tokens, corrupt, prefix_caching, windows
) -> None:
    """``windows``: one per KV-cache group; blocks behind a window are released even as verify steps roll
    drafts back, in one group or beside a global one."""
    max_len = 40
    sched = Scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=4,
        max_model_len=max_len,
        enable_prefix_caching=prefix_caching,
        group_windows=windows,
    )
    shared = prompts[0][:6]
    requests = [make_request(f"r{i}", shared + p, max_tokens[i]) for i, p in enumerate(prompts)]
    for r in requests:
        if blocks_held_at_most(r.num_prompt_tokens, block_size, windows, budget) <= num_blocks - 1:
            sched.add_request(r)
    live = [r for r in requests if r.request_id in sched.requests]
    runner = FakeRunner(sched)
    step = 0
    while sched.has_unfinished_requests():
        assert step < 2000, "livelock"
        for r in sched.running:
            if r.num_computed_tokens == r.num_tokens - 1:
                drafts = _truth(r.all_token_ids, k)
                for j in range(k):
                    if corrupt[(step * 7 + j + len(r.all_token_ids)) % 64]:
                        drafts[j] = (drafts[j] + 1) % 48
                r.draft_token_ids = drafts
        out = sched.schedule()
        if out.is_empty:
            step += 1
            continue
        sched.update_from_output(out, _execute(runner, out))
        check_invariants(sched)
        runner.check_computed_kv()
        _check_cached_blocks_hold_known_tokens(runner)
        for r in sched.running:
            assert r.num_scheduled_drafts == 0 and r.num_computed_tokens <= r.num_tokens
        step += 1
    for r in live:
        # A request stops at the pool's size, unless windows keep what it holds below the pool at any length.
        cap = longest_fitting_request(num_blocks - 1, block_size, windows, budget, max_len)
        assert (r.output_token_ids, r.status) == reference_generate(r, cap)
        assert r.num_accepted_tokens <= r.num_draft_tokens
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.pool.num_usable_blocks


def test_drafts_never_pass_max_tokens_or_the_budget() -> None:
    sched = Scheduler(num_blocks=20, block_size=4, max_num_batched_tokens=4, max_num_seqs=2, max_model_len=64)
    r = make_request("r", [3, 4, 5], max_tokens=3)
    sched.add_request(r)
    runner = FakeRunner(sched)
    sched.update_from_output(out := sched.schedule(), _execute(runner, out))  # prefill: one token out
    r.draft_token_ids = _truth(r.all_token_ids, 6)
    out = sched.schedule()
    assert out.scheduled[0].draft_token_ids == r.output_token_ids[:0] + _truth(r.all_token_ids, 1)  # 3 - 1 - 1 = 1
    sched.update_from_output(out, _execute(runner, out))
    assert r.num_output_tokens == 3 and r.status == RequestStatus.FINISHED_LENGTH
