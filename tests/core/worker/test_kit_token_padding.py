"""StepLayout.build's ``pad_tokens_to``: a verify-shaped step padded to a fixed (requests, tokens) shape.

The real requests' rows must be exactly what the unpadded layout has; the dummies follow,
one token each but the last, which absorbs every remaining padding token (at least one).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.kit import BlockTables, LayoutBuffers, StepLayout


def _req(i: int, tokens: list[int], start: int, blocks: list[int], drafts: int = 0) -> ScheduledRequest:
    return ScheduledRequest(
        f"r{i}", tokens, start, blocks, True, SamplingParams(), draft_token_ids=tokens[len(tokens) - drafts :]
    )


@st.composite
def verify_steps(draw: st.DrawFn) -> tuple[int, list[ScheduledRequest], int, int, bool]:
    """(block size, requests of 1..k+1 tokens, pad_to, pad_tokens_to, preallocated) as the CUDA runner asks."""
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    k = draw(st.integers(1, 6))
    n = draw(st.integers(1, 6))
    size = n + draw(st.integers(0, 3))  # the bucket's request count, absorber excluded
    reqs = []
    for i in range(n):
        q = draw(st.integers(1, k + 1))
        start = draw(st.integers(0, 40))
        need = -(-(start + q) // bs)
        blocks = draw(st.lists(st.integers(1, 500), min_size=need, max_size=need + 2, unique=True))
        reqs.append(_req(i, draw(st.lists(st.integers(1, 999), min_size=q, max_size=q)), start, blocks, q - 1))
    return bs, reqs, size + 1, size * (k + 1) + 1, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(step=verify_steps())
def test_token_padding_keeps_real_rows_and_totals(step) -> None:
    bs, reqs, pad_to, pad_tokens, preallocated = step
    out = SchedulerOutput(reqs, sum(len(r.token_ids) for r in reqs))
    plain_tables = BlockTables()
    plain = StepLayout.build(reqs, plain_tables, plain_tables.apply(out), bs)
    tables = BlockTables()
    rows = tables.apply(out)
    buffers = LayoutBuffers.allocate(64, 12, 64) if preallocated else None
    layout = StepLayout.build(reqs, tables, rows, bs, buffers=buffers, pad_to=pad_to, pad_tokens_to=pad_tokens)
    n, real = len(reqs), plain.num_tokens
    absorber = pad_tokens - real - (pad_to - n - 1)
    assert absorber >= 1
    width = max(plain.block_table.shape[1], -(-absorber // bs))
    if buffers is not None and not buffers.fits(pad_tokens, pad_to, width):
        assert layout.buffers is None and layout.padded_to is None and layout.num_tokens == real
        return
    assert layout.padded_to == pad_to and (layout.num_reqs, layout.num_tokens) == (pad_to, pad_tokens)
    # Real rows: unchanged.
    for name in ("token_ids", "positions", "slot_mapping"):
        assert getattr(layout, name)[:real].tolist() == getattr(plain, name).tolist()
    assert layout.query_start_loc[: n + 1].tolist() == plain.query_start_loc.tolist()
    assert layout.seq_lens[:n].tolist() == plain.seq_lens.tolist()
    cols = plain.block_table.shape[1]
    assert layout.block_table[:n, :cols].tolist() == plain.block_table.tolist()
    assert not layout.block_table[:n, cols:].any()  # a wider absorber: the real rows end in null blocks
    assert layout.logits_indices.tolist() == plain.logits_indices.tolist()
    assert layout.num_scheduled_tokens == real
    # Padding: one-token dummies, then the absorber; all at position 0 of the null block.
    pad_lens = [1] * (pad_to - n - 1) + [absorber]
    q = np.diff(layout.query_start_loc).tolist()
    assert q == [len(r.token_ids) for r in reqs] + pad_lens and layout.query_start_loc[-1] == pad_tokens
    assert layout.seq_lens[n:].tolist() == pad_lens  # each dummy's context is its own query
    assert layout.query_lens_cpu == q and layout.seq_lens_cpu == layout.seq_lens.tolist()
    assert layout.max_query_len == max(q) and layout.max_seq_len == max(layout.seq_lens_cpu)
    assert not layout.token_ids[real:].any() and not layout.positions[real:].any()
    assert not layout.slot_mapping[real:].any() and not layout.block_table[n:].any()
    assert layout.block_table.shape[1] * bs >= absorber  # the absorber's context fits its (null) table row


def test_token_padding_refuses_what_it_cannot_hold() -> None:
    reqs = [_req(0, [1, 2, 3], 0, [1], 2), _req(1, [4], 5, [2, 3])]
    tables = BlockTables()
    rows = tables.apply(SchedulerOutput(reqs, 4))
    with pytest.raises(ValueError, match="pad_to > 2"):  # no room for an absorber
        StepLayout.build(reqs, tables, rows, 4, pad_to=2, pad_tokens_to=9)
    with pytest.raises(ValueError, match="pad_tokens_to >= 5"):  # fewer tokens than the step and one dummy
        StepLayout.build(reqs, tables, rows, 4, pad_to=3, pad_tokens_to=4)
    layout = StepLayout.build(reqs, tables, rows, 4, pad_to=3, pad_tokens_to=5)  # an absorber of exactly one
    assert layout.query_lens_cpu == [3, 1, 1] and layout.num_tokens == 5
