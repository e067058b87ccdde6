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
from kvik.layers.bidirectional import EncoderAttention, SequenceBatch

H, D = 2, 8


def metadata(lens: list[int], cached: int = 0, padding: list[int] | None = None) -> AttentionMetadata[torch.Tensor]:
    """A step of requests ``lens`` (each with ``cached`` tokens before), then a runner's padding requests."""
    padding = padding or []
    every = list(lens) + padding
    starts = np.concatenate([[0], np.cumsum(every)]).astype(np.int32)
    empty = torch.zeros(0, dtype=torch.int32)
    return AttentionMetadata(
        num_tokens=sum(every), num_reqs=len(every), query_start_loc=torch.from_numpy(starts), seq_lens=empty,
        block_tables=empty, slot_mapping=empty, block_size=16, max_query_len=max(every),
        max_seq_len=max(every) + cached, query_lens_cpu=every, seq_lens_cpu=[n + cached for n in lens] + padding,
        num_padding_reqs=len(padding),
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
    padding=st.lists(st.integers(1, 30), max_size=2),  # a runner's padding requests (an absorber may be long)
    into_buffer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_request_attends_only_to_itself(
    lens: list[int], window: int | None, padding: list[int], into_buffer: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    real, rows = sum(lens), sum(lens) + sum(padding)
    qkv = torch.randn(rows, 3 * H * D, generator=generator, dtype=torch.float64)
    batch = SequenceBatch.from_metadata(metadata(lens, padding=padding), rows, torch.device("cpu"))
    assert batch.max_len == max(lens)  # padding requests never widen the padded batch
    buffer = torch.full((rows, H * D), float("nan"), dtype=torch.float64) if into_buffer else None
    out = batch.attend(qkv, H, D, D**-0.5, window, buffer)
    assert out.shape == (rows, H * D) and (buffer is None or out is buffer)
    torch.testing.assert_close(out[:real], reference(qkv[:real], lens, window), rtol=1e-9, atol=1e-9)
    assert not out[real:].any()  # rows padding the step come out zero
    if len(set(lens)) == 1:
        assert batch.dest is None and batch.key_mask is None  # equal lengths: nothing padded or masked


def test_a_step_builds_its_batch_once_for_every_layer() -> None:
    meta = metadata([3, 5])
    qkv = torch.randn(8, 3 * H * D, dtype=torch.float64)
    first, second = EncoderAttention(H, D, D**-0.5), EncoderAttention(H, D, D**-0.5, window=1)
    torch.testing.assert_close(first(qkv, meta), reference(qkv, [3, 5], None), rtol=1e-9, atol=1e-9)
    batch = meta.backend_data["sequence_batch"]
    torch.testing.assert_close(second(qkv, meta), reference(qkv, [3, 5], 1), rtol=1e-9, atol=1e-9)
    assert meta.backend_data["sequence_batch"] is batch


def test_a_request_split_over_steps_is_refused() -> None:
    with pytest.raises(RuntimeError, match="whole prompts"):
        SequenceBatch.from_metadata(metadata([4, 3], cached=2), 7, torch.device("cpu"))
