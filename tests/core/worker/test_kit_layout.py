"""The runner kit's step layout against its definitions, and the logprob assembler."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.kit import BlockTables, LayoutBuffers, StepLayout, TopLogprobs, assemble_output


@st.composite
def steps(draw: st.DrawFn) -> tuple[int, list[ScheduledRequest], int | None, bool]:
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    decode = draw(st.booleans())
    reqs = []
    for i in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, 40))
        n = 1 if decode else draw(st.integers(1, 9))
        need = -(-(start + n) // bs)
        blocks = draw(st.lists(st.integers(1, 500), min_size=need, max_size=need + 2, unique=True))
        pending = draw(st.integers(0, 1)) if decode else 0
        tokens = draw(st.lists(st.integers(1, 999), min_size=n, max_size=n))
        if pending:
            tokens[-1] = 0
        params = SamplingParams(prompt_logprobs=draw(st.sampled_from([None, 2])))
        prompt = draw(st.lists(st.integers(1, 999), min_size=1, max_size=start + n + 2))
        reqs.append(
            ScheduledRequest(
                f"r{i}", tokens, start, blocks, draw(st.booleans()), params, prompt, num_pending_tokens=pending
            )
        )
    pad = draw(st.sampled_from([None, len(reqs), len(reqs) + 3])) if decode else None
    return bs, reqs, pad, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(step=steps())
def test_layout_matches_the_definitions(step) -> None:
    bs, reqs, pad, preallocated = step
    tables = BlockTables(rows=2, cols=2)
    rows = tables.apply(SchedulerOutput(reqs, sum(r.num_new_tokens for r in reqs)))
    buffers = LayoutBuffers.allocate(64, 12, 24) if preallocated else None
    layout = StepLayout.build(reqs, tables, rows, bs, buffers=buffers, pad_to=pad)
    cols = max(-(-(r.start_pos + r.num_new_tokens) // bs) for r in reqs)
    fits = buffers is not None and (pad or len(reqs)) * cols <= 12 * 24
    if buffers is not None and not fits:  # too big for the buffers: fresh arrays, no padding
        assert layout.buffers is None and layout.padded_to is None
        pad = None
    else:
        assert layout.buffers is buffers and layout.padded_to == pad
    extra = (pad or len(reqs)) - len(reqs)
    pos = [p for r in reqs for p in range(r.start_pos, r.start_pos + r.num_new_tokens)]
    slots = [
        r.new_block_ids[p // bs] * bs + p % bs for r in reqs for p in range(r.start_pos, r.start_pos + r.num_new_tokens)
    ]
    assert layout.token_ids.tolist() == [t for r in reqs for t in r.token_ids] + [0] * extra
    assert layout.positions.tolist() == pos + [0] * extra
    assert layout.slot_mapping.tolist() == slots + [0] * extra  # padding writes the null block
    q = [r.num_new_tokens for r in reqs] + [1] * extra
    assert layout.query_start_loc.tolist() == [sum(q[:i]) for i in range(len(q) + 1)]
    assert layout.seq_lens.tolist() == [r.start_pos + r.num_new_tokens for r in reqs] + [1] * extra
    assert (layout.num_reqs, layout.num_tokens, layout.max_query_len) == (len(q), sum(q), max(q))
    assert layout.query_lens_cpu == q and layout.seq_lens_cpu == layout.seq_lens.tolist()
    for i, r in enumerate(reqs):
        nb = -(-(r.start_pos + r.num_new_tokens) // bs)
        assert layout.block_table[i, :nb].tolist() == r.new_block_ids[:nb]
        assert not layout.block_table[i, len(r.new_block_ids) :].any()
    assert not layout.block_table[len(reqs) :].any()
    ends = np.cumsum([r.num_new_tokens for r in reqs]) - 1
    assert layout.sampling_requests() == [r for r in reqs if r.sample]
    assert layout.logits_indices.tolist() == [int(ends[i]) for i, r in enumerate(reqs) if r.sample]
    assert layout.pending_rows.tolist() == [int(ends[i]) for i, r in enumerate(reqs) if r.num_pending_tokens]
    assert layout.pending_request_ids == [r.request_id for r in reqs if r.num_pending_tokens]
    for pr in layout.prompt_rows:
        r = reqs[pr.index]
        first = int(ends[pr.index]) - r.num_new_tokens + 1
        assert pr.rows.tolist() == list(range(first, first + len(pr.targets)))
        assert pr.targets == r.prompt_token_ids[r.start_pos + 1 : r.start_pos + 1 + len(pr.targets)]


@settings(max_examples=100, deadline=None)
@given(
    bs=st.sampled_from([1, 4, 16]),
    num_groups=st.integers(2, 3),
    spans=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 9)), min_size=1, max_size=5),
    pad=st.booleans(),
    preallocated=st.booleans(),
)
def test_grouped_tables_split_into_one_table_and_slot_mapping_per_group(
    bs: int, num_groups: int, spans: list[tuple[int, int]], pad: bool, preallocated: bool
) -> None:
    """Rows hold each position's ids for every KV-cache group side by side: the layout gives each group its
    own table and slot mapping; the singular fields are group 0's."""
    reqs, next_id = [], 1
    for i, (start, n) in enumerate(spans):
        positions = -(-(start + n) // bs)
        ids = list(range(next_id, next_id + positions * num_groups))
        next_id += len(ids)
        reqs.append(ScheduledRequest(f"r{i}", [7] * n, start, ids, True, SamplingParams()))
    tables = BlockTables(num_groups=num_groups)
    rows = tables.apply(SchedulerOutput(reqs, sum(r.num_new_tokens for r in reqs)))
    buffers = LayoutBuffers.allocate(64, 12, 16, num_groups) if preallocated else None
    pad_to = len(reqs) + 2 if pad and all(n == 1 for _, n in spans) else None
    layout = StepLayout.build(reqs, tables, rows, bs, buffers=buffers, pad_to=pad_to)
    assert layout.block_tables.shape[0] == layout.slot_mappings.shape[0] == num_groups
    assert (layout.block_tables[0] == layout.block_table).all()
    assert (layout.slot_mappings[0] == layout.slot_mapping).all()
    for g in range(num_groups):
        want = [
            r.new_block_ids[(p // bs) * num_groups + g] * bs + p % bs
            for r in reqs
            for p in range(r.start_pos, r.start_pos + r.num_new_tokens)
        ]
        got = layout.slot_mappings[g].tolist()
        assert got[: len(want)] == want and not any(got[len(want) :])  # padding writes the null block
        for i, r in enumerate(reqs):
            own = r.new_block_ids[g::num_groups]
            assert layout.block_tables[g, i, : len(own)].tolist() == own
            assert not layout.block_tables[g, i, len(own) :].any()
        assert not layout.block_tables[g, len(reqs) :].any()


def test_short_table_is_a_clear_error() -> None:
    req = ScheduledRequest("a", list(range(9)), 0, [1, 2], True, SamplingParams())
    tables = BlockTables()
    rows = tables.apply(SchedulerOutput([req], 9))
    with pytest.raises(ValueError, match="has 2 blocks for 9 tokens"):
        StepLayout.build([req], tables, rows, 4)


def test_assemble_output() -> None:
    reqs = [
        ScheduledRequest("a", [1], 0, [1], True, SamplingParams(logprobs=1)),
        ScheduledRequest("b", [1], 0, [2], True, SamplingParams()),
    ]
    top = TopLogprobs(
        ids=np.array([[7, 7, 3], [5, 9, 5]]),
        logprobs=np.array([[-0.1, -0.1, -2.0], [-1.5, -0.5, -1.5]], dtype=np.float32),
        ranks=np.array([1, 2]),
    )
    out = assemble_output(reqs, np.array([7, 5]), top)
    assert out.sampled_token_ids == {"a": [7], "b": [5]}
    assert out.logprobs == {"a": [{7: pytest.approx(-0.1)}]}  # k=1: the chosen token is the top one
    assert out.logprob_ranks == {"a": [1]}
