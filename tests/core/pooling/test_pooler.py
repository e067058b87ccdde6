"""The runner's per-step pooling reduction (kvik.pooling.pooler): MEAN sums over a step's spans."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.pooling.pooler import _span_sums


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), length=st.integers(1, 9), first=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_back_to_back_spans_sum_as_gathered_ones(n: int, length: int, first: int, seed: int) -> None:
    """Equal spans lying back to back (an encoder step of equal texts) are summed over a view; the same
    spans in another order take the padded gather. Both give each span's float32 sum, bit for bit."""
    hidden = torch.randn(first + n * length + 3, 8, generator=torch.Generator().manual_seed(seed)).bfloat16()
    spans = [(first + i * length, first + (i + 1) * length) for i in range(n)]
    viewed = _span_sums(hidden, spans)
    assert viewed.dtype == torch.float32 and viewed.shape == (n, 8)
    if n > 1:  # reversed, the spans are no longer back to back
        assert torch.equal(viewed, _span_sums(hidden, spans[::-1]).flip(0))
    for (a, b), row in zip(spans, viewed, strict=True):
        torch.testing.assert_close(row, hidden[a:b].float().sum(0), rtol=1e-6, atol=1e-5)


def test_ragged_spans_leave_their_padding_out() -> None:
    hidden = torch.arange(40, dtype=torch.float32).view(10, 4)
    spans = [(0, 3), (3, 4), (6, 10)]
    expected = torch.stack([hidden[a:b].sum(0) for a, b in spans])
    assert torch.equal(_span_sums(hidden, spans), expected)
