"""The Triton LoRA shrink/expand kernels against the torch reference (kvik.lora.compute).

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kvik.lora.compute import add_lora_reference
from kvik_cuda.lora_kernels import add_lora_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("shards", "rank", "dtype"),
    [((24,), 8, torch.float32), ((16, 8, 8), 4, torch.float32), ((40, 40), 16, torch.float16), ((16, 8, 8), 8, torch.bfloat16)],
)
def test_kernels_match_the_reference(shards: tuple[int, ...], rank: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(sum(shards) + rank)
    num_slots, in_features, out = 3, 48, sum(shards)
    starts = tuple(sum(shards[:k]) for k in range(len(shards)))
    x = torch.randn(7, in_features, generator=g).to(DEVICE, dtype)
    a = (torch.randn(num_slots, len(shards) * rank, in_features, generator=g) * 0.3).to(DEVICE, dtype)
    b = (torch.randn(num_slots, out, rank, generator=g) * 0.3).to(DEVICE, dtype)
    a[:, rank - 1 :: rank] = 0  # a lower-rank adapter padded into the slot, as write_slot leaves it
    slots = torch.tensor([2, -1, 0, 0, 1, -1, 2], device=DEVICE)
    y = torch.randn(7, out, generator=g).to(DEVICE, dtype)
    want, got = y.clone(), y.clone()
    add_lora_reference(want, x, a, b, slots, starts)
    add_lora_triton(got, x, a, b, slots, starts)
    assert torch.equal(got[slots < 0], y[slots < 0])  # base-model rows untouched
    assert not torch.equal(want, y)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_empty_step_and_all_base_rows() -> None:
    a, b = torch.ones(2, 4, 8, device=DEVICE), torch.ones(2, 6, 4, device=DEVICE)
    y = torch.zeros(3, 6, device=DEVICE)
    add_lora_triton(y, torch.ones(3, 8, device=DEVICE), a, b, torch.full((3,), -1, device=DEVICE), (0,))
    assert not y.any()
    add_lora_triton(y[:0], torch.ones(0, 8, device=DEVICE), a, b, torch.zeros(0, dtype=torch.int64, device=DEVICE), (0,))
