"""Bidirectional attention over a step's flattened requests (kvik.layers.bidirectional): for any mix of
lengths, windows and padding rows, each row equals plain softmax attention over its own request's keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.attention.backend import AttentionMetadata
from kvik.layers.bidirectional import SequenceBatch

H, D = 2, 8


def metadata(lens: list[int], cached: int = 0) -> AttentionMetadata[torch.Tensor]:
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    empty = torch.zeros(0, dtype=torch.int32)
    return AttentionMetadata(
        num_tokens=sum(lens), num_reqs=len(lens), query_start_loc=torch.from_numpy(starts), seq_lens=empty,
        block_tables=empty, slot_mapping=empty, block_size=16, max_query_len=max(lens),
        max_seq_len=max(lens) + cached, query_lens_cpu=list(lens), seq_lens_cpu=[n + cached for n in lens],
    )  # fmt: skip


def reference(qkv: torch.Tensor, lens: list[int], window: int | None) -> torch.Tensor:
    """Per request, per row: softmax(q k^T / sqrt(D)) v over the keys it may see."""
    out, start = [], 0
    for n in lens:
        q, k, v = qkv[start : start + n].view(n, 3, H, D).unbind(1)  # each [n, H, D]
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D)
        if window is not None:
            far = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() > window
            scores = scores.masked_fill(far, float("-inf"))
        out.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(n, H * D))
        start += n
    return torch.cat(out)


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    window=st.one_of(st.none(), st.integers(0, 6)),
    padding_rows=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_each_request_attends_only_to_itself(lens: list[int], window: int | None, padding_rows: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    real = sum(lens)
    qkv = torch.randn(real + padding_rows, 3 * H * D, generator=generator, dtype=torch.float64)
    batch = SequenceBatch.from_metadata(metadata(lens), real + padding_rows, torch.device("cpu"))
    out = batch.attend(qkv, H, D, D**-0.5, window)
    assert out.shape == (real + padding_rows, H * D)
    torch.testing.assert_close(out[:real], reference(qkv[:real], lens, window), rtol=1e-9, atol=1e-9)
    assert not out[real:].any()  # rows padding the step stay zero
    if len(set(lens)) == 1 and not padding_rows:
        assert batch.dest is None and batch.key_mask is None  # equal lengths: nothing padded or masked


def test_a_request_split_over_steps_is_refused() -> None:
    with pytest.raises(RuntimeError, match="whole prompts"):
        SequenceBatch.from_metadata(metadata([4, 3], cached=2), 7, torch.device("cpu"))
