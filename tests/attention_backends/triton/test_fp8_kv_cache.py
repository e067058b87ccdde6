"""The triton backend on an FP8 (e4m3) KV cache: the write kernel's quantization and the kernels' reads.

Without a GPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install --no-deps triton)")

from kvik.attention import fp8_kv
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.testing.conformance.fp8_kv import check_fp8_kv_cache
from kvik_triton_attention.testing import SmallTileTritonAttentionBackend

from .paged_batch import fresh_metadata, make_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32


class SplitKV(SmallTileTritonAttentionBackend):
    force_num_splits = 4


def test_write_kernel_rounds_like_torch_on_every_e4m3_value_and_midpoint() -> None:
    """Each finite e4m3 value, the midpoints between neighbours (ties go to the even mantissa), and values
    past the saturation point, written by the kernel, read back as torch's own float8 cast of them."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_kv.FP8_DTYPE).float()
    grid = grid[~grid.isnan()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids.nextafter(torch.tensor(float("inf"))), torch.tensor([500.0, -1e4, 449.0])])
    heads, head_size = 2, 16
    x = torch.nn.functional.pad(x, (0, -x.numel() % (heads * head_size))).view(-1, heads, head_size)
    backend = SmallTileTritonAttentionBackend(heads, head_size, heads, 0.25)
    backend.set_kv_scale("k", 1.0)
    backend.set_kv_scale("v", 0.5)
    n = x.shape[0]
    cache = torch.zeros(2, n, 1, heads, head_size, dtype=fp8_kv.FP8_DTYPE, device=DEVICE)
    backend.write_kv(x.to(DEVICE), x.to(DEVICE), cache, torch.arange(n, device=DEVICE))
    k, v = backend.cache_entries(cache, torch.arange(n, device=DEVICE))
    assert torch.equal(k.cpu().float(), fp8_kv.quantize(x, 1.0).float())
    assert torch.equal(v.cpu().float(), fp8_kv.quantize(x, 0.5).float())


def test_nan_is_written_as_a_finite_e4m3_value() -> None:
    """The kernels read a partly filled chunk of V whole (its keys past the sequence get P = 0), which is only
    safe while no cache byte is a NaN: a NaN in K/V saturates like any value past the range."""
    backend = SmallTileTritonAttentionBackend(1, 16, 1, 0.25)
    x = torch.full((1, 1, 16), float("nan"))
    x[0, 0, 1] = -float("nan")
    cache = torch.zeros(2, 1, 1, 1, 16, dtype=fp8_kv.FP8_DTYPE, device=DEVICE)
    backend.write_kv(x.to(DEVICE), x.to(DEVICE), cache, torch.tensor([0], device=DEVICE))
    assert not cache.float().isnan().any()
    assert cache.float().abs().eq(448.0).all()


@pytest.mark.parametrize("block_size", [16, 8, 32, 24])
def test_v_is_stored_keys_contiguous_per_block_and_read_back_by_cache_entries(block_size: int) -> None:
    """An FP8 cache's V sits [kv_heads, head_size, block_size] inside each block; cache_entries reads it back
    at any slot (block sizes below, equal to, above the tile's 16 keys, and one that is no power of two)."""
    heads, head_size, blocks = 2, 16, 3
    backend = SmallTileTritonAttentionBackend(heads, head_size, heads, 0.25)
    n = blocks * block_size
    k = torch.randn(n, heads, head_size)
    v = torch.randn(n, heads, head_size)
    slots = torch.randperm(n)
    cache = torch.zeros(2, blocks, block_size, heads, head_size, dtype=fp8_kv.FP8_DTYPE, device=DEVICE)
    backend.write_kv(k.to(DEVICE), v.to(DEVICE), cache, slots.to(DEVICE))
    got_k, got_v = backend.cache_entries(cache, slots.to(DEVICE))
    assert torch.equal(got_k.cpu().float(), fp8_kv.quantize(k, 1.0).float())
    assert torch.equal(got_v.cpu().float(), fp8_kv.quantize(v, 1.0).float())
    order = torch.argsort(slots)  # by slot: entry (block b, offset o, head h, dim d)
    want_v = fp8_kv.quantize(v, 1.0)[order].view(blocks, block_size, heads, head_size).permute(0, 2, 3, 1)
    assert torch.equal(cache[1].cpu().view(torch.uint8).view(blocks, heads, head_size, block_size),
                       want_v.contiguous().view(torch.uint8))  # fmt: skip


def _triton_layout(cache: torch.Tensor) -> torch.Tensor:
    """A copy of a kv_cache_shape-ordered FP8 cache with each block's V as [kv_heads, head_size, block_size]."""
    out = cache.clone()
    _, blocks, block_size, heads, head_size = cache.shape
    out[1] = cache[1].permute(0, 2, 3, 1).contiguous().view(blocks, block_size, heads, head_size)
    return out


@pytest.mark.parametrize("window", [None, 7])
def test_triton_fp8_cache_matches_attention_over_the_dequantized_cache(window: int | None) -> None:
    check_fp8_kv_cache(SmallTileTritonAttentionBackend, DEVICE, DTYPE, window=window, seed=3)


@pytest.mark.parametrize("window", [None, 7])
def test_bf16_queries_on_an_fp8_cache_take_fp16_dots_within_bf16_tolerance(window: int | None) -> None:
    """A bf16 model's dots over an FP8 cache run in fp16 (the cheaper widening): still attention over the
    dequantized cache within bf16's tolerance."""
    check_fp8_kv_cache(SmallTileTritonAttentionBackend, DEVICE, torch.bfloat16, window=window, seed=5)


def test_split_kv_decode_on_an_fp8_cache_matches_torch_ref() -> None:
    """Decode-only steps take the split-KV (flash-decoding) path: V's scale must survive the split reduction."""
    step = make_step([(70, 1), (33, 1), (5, 1)], num_heads=8, num_kv_heads=2, head_size=32, block_size=16,
                     dtype=torch.float32, device=DEVICE)  # fmt: skip
    cache = fp8_kv.quantize(step.kv_cache * 3.0, 2.0)  # k and v both stored at scale 2
    outs = []
    for cls, layout in ((SplitKV, _triton_layout), (TorchRefAttentionBackend, torch.Tensor.clone)):
        backend = cls(8, 32, 2, 32**-0.5)
        backend.set_kv_scale("k", 2.0)
        backend.set_kv_scale("v", 2.0)
        meta = fresh_metadata(step.metadata)
        cls.prepare(meta)
        q = step.query.to(DTYPE)
        outs.append(backend.forward(q, step.key.to(DTYPE), step.value.to(DTYPE), layout(cache), meta).float())
    assert torch.allclose(outs[0], outs[1], atol=1e-3 if torch.float32 == DTYPE else 5e-2, rtol=1e-3)


class FP8DecodeTile32(SmallTileTritonAttentionBackend):
    fp8_decode_tile = (16, 32, 2)


@pytest.mark.parametrize("block_size", [8, 24, 64])
def test_fp8_cache_attention_with_other_block_sizes(block_size: int) -> None:
    """Keys-contiguous V is read in runs that stay inside one block: runs shorter than the tile (block size 8),
    runs of the block size's power-of-two part (24: runs of 8), and blocks longer than the tile (64)."""
    check_fp8_kv_cache(FP8DecodeTile32, DEVICE, DTYPE, block_size=block_size, seed=block_size)
