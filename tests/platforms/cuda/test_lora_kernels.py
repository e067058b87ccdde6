"""The Triton LoRA shrink/expand kernels against the torch reference (kvik.lora.compute).

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kvik.lora.compute import add_lora_reference
from kvik_cuda.lora_kernels import LoRAKernelConfig, add_lora_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("shards", "rank", "dtype", "in_features", "split_k"),
    [
        ((24,), 8, torch.float32, 48, None),
        ((16, 8, 8), 4, torch.float32, 300, 3),  # split-K: three partial sums over the reduction
        ((40, 40), 16, torch.float16, 48, None),
        ((16, 8, 8), 8, torch.bfloat16, 260, 2),
    ],
)
def test_bgmv_kernels_match_the_reference(
    shards: tuple[int, ...], rank: int, dtype: torch.dtype, in_features: int, split_k: int | None
) -> None:
    g = torch.Generator().manual_seed(sum(shards) + rank)
    num_slots, out = 3, sum(shards)
    starts = tuple(sum(shards[:k]) for k in range(len(shards)))
    x = torch.randn(7, in_features, generator=g).to(DEVICE, dtype)
    a = (torch.randn(num_slots, len(shards) * rank, in_features, generator=g) * 0.3).to(DEVICE, dtype)
    b = (torch.randn(num_slots, out, rank, generator=g) * 0.3).to(DEVICE, dtype)
    a[:, rank - 1 :: rank] = 0  # a lower-rank adapter padded into the slot, as write_slot leaves it
    slots = torch.tensor([2, -1, 0, 0, 1, -1, 2], device=DEVICE)
    y = torch.randn(7, out, generator=g).to(DEVICE, dtype)
    want, got = y.clone(), y.clone()
    add_lora_reference(want, x, a, b, slots, starts)
    add_lora_triton(got, x, a, b, slots, starts, config=LoRAKernelConfig(kernel="bgmv", split_k=split_k or 0))
    assert torch.equal(got[slots < 0], y[slots < 0])  # base-model rows untouched
    assert not torch.equal(want, y)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, in_features / 48))


def test_split_choice_depends_on_shapes_only() -> None:
    from kvik_cuda.lora_kernels import shrink_splits

    assert shrink_splits(1, 14336) == 14 and shrink_splits(1, 4096) == 4 and shrink_splits(1, 64) == 1
    assert shrink_splits(256, 14336) == 1  # enough tokens to fill the GPU


def test_empty_step_and_all_base_rows() -> None:
    a, b = torch.ones(2, 4, 8, device=DEVICE), torch.ones(2, 6, 4, device=DEVICE)
    y = torch.zeros(3, 6, device=DEVICE)
    add_lora_triton(y, torch.ones(3, 8, device=DEVICE), a, b, torch.full((3,), -1, device=DEVICE), (0,))
    assert not y.any()
    add_lora_triton(y[:0], torch.ones(0, 8, device=DEVICE), a, b, torch.zeros(0, dtype=torch.int64, device=DEVICE), (0,))


@pytest.mark.parametrize("num_tokens", [1, 5, 70])  # BGMV buckets, then an SGMV one
def test_project_equals_base_then_the_delta(num_tokens: int) -> None:
    """TritonLoRA.project (on a GPU: the shrink on a side stream beside the base matmul) gives exactly what the
    base projection followed by add_lora gives, and the tile map it cuts or reuses serves both."""
    from kvik_cuda.lora_kernels import TritonLoRA, config_for

    g = torch.Generator().manual_seed(num_tokens)
    shards, rank, in_features = (16, 8, 8), 4, 64
    starts = (0, 16, 24)
    w = torch.randn(sum(shards), in_features, generator=g).to(DEVICE, torch.float16)
    x = torch.randn(num_tokens, in_features, generator=g).to(DEVICE, torch.float16)
    a = (torch.randn(3, len(shards) * rank, in_features, generator=g) * 0.3).to(DEVICE, torch.float16)
    b = (torch.randn(3, sum(shards), rank, generator=g) * 0.3).to(DEVICE, torch.float16)
    slots = torch.tensor([(t % 4) - 1 for t in range(num_tokens)], device=DEVICE)
    slots = slots.sort(stable=True).values  # the scheduler's order: rows grouped by adapter

    def base(inp: torch.Tensor) -> torch.Tensor:
        return inp @ w.T

    kernels = TritonLoRA(128, DEVICE)
    kernels.prepare_step(slots)
    want = base(x)
    kernels(want, x, a, b, slots, starts)
    got = kernels.project(x, a, b, slots, starts, base)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(got, want)
    ref = base(x)
    add_lora_reference(ref, x, a, b, slots, starts)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=2e-3)
    assert config_for(num_tokens).kernel == ("bgmv" if num_tokens <= 64 else "sgmv")
