"""One-launch LoRA delta for small steps (decode): each program recomputes the shrink it needs.

At one to a few token rows the two-launch kernels (:mod:`kvik_cuda.lora_sgmv`) are bound by
launch latency, not work: a rank-16 delta is 1/256 of the projection's FLOPs. Here a program owns
a tile of at most ``BLOCK_M`` rows under one adapter slot (the step's tile map,
:mod:`kvik_cuda.lora_tiles`) × ``BLOCK_N`` output columns and, for each shard its columns meet,
computes that shard's shrink ``x @ a[slot, k*R:(k+1)*R].T`` over all of ``in`` itself
(``tl.dot``, float32), then expands it onto its columns. The shrink is repeated by
every column block (``R x in`` of ``a`` read from L2 per program), which is cheap while rows are
few and saves the second launch and the float32 buffer between them. The shrink is one float32
sum over ``in`` (no split-K), rounded as the reference rounds: delta to ``y``'s dtype, then added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kvik_cuda.lora_sgmv import INTERPRETED, add_delta, column_shards, tile_rows
from kvik_cuda.lora_tiles import TileMap, tile_programs

if TYPE_CHECKING:
    from kvik_cuda.lora_kernels import LoRAKernelConfig

ONE_WAVE = 132  # programs an H100/H200 runs at once at one program per SM


@triton.jit(do_not_specialize=["num_programs"])  # one compile for every row count (T=1 included)
def _fused_kernel(
    x_ptr, a_ptr, b_ptr, tiles_ptr, count_ptr, y_ptr,
    num_programs, in_features, out_features, rank, start1, start2,
    stride_xt, stride_al, stride_ar, stride_bl, stride_bo, stride_yt, stride_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < out_features
    shard, first_shard, last_shard = column_shards(cols, col_ok, start1, start2)
    # Grid-stride over the map: one tile per program when the step's rows are grouped by slot.
    for tile in range(tl.program_id(0), tl.load(count_ptr), num_programs):
        rows64, row_ok, slot = tile_rows(tiles_ptr, stride_tiles, tile, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(first_shard, last_shard + 1):
            in_shard = col_ok & (shard == k)
            for r0 in range(0, rank, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                r_ok = rs < rank
                s = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                for k0 in range(0, in_features, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < in_features
                    x_mask = row_ok[:, None] & k_ok[None, :]
                    xv = tl.load(x_ptr + rows64[:, None] * stride_xt + ks[None, :], mask=x_mask, other=0.0)
                    a_rows = k * rank + rs
                    a_ptrs = a_ptr + slot * stride_al + a_rows[None, :] * stride_ar + ks[:, None]
                    av = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(xv.dtype)
                    if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly; float32 products are the same
                        xv, av = xv.to(tl.float32), av.to(tl.float32)
                    s = tl.dot(xv, av, s, input_precision="ieee")  # [BLOCK_M, BLOCK_R]
                b_mask = r_ok[:, None] & in_shard[None, :]
                b_ptrs = b_ptr + slot * stride_bl + cols[None, :] * stride_bo + rs[:, None]
                bv = tl.load(b_ptrs, mask=b_mask, other=0.0)
                acc = tl.dot(s, bv.to(tl.float32), acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        add_delta(y_ptr, stride_yt, rows64, row_ok, cols, col_ok, acc)


def fused_block_n(out_features: int, config: LoRAKernelConfig) -> int:
    """The config's column block, widened (up to 256) until the column blocks fit in one wave of
    programs: every program re-reads R x in of ``a``, so a second wave would double the latency."""
    block_n = config.block_n
    while block_n < 256 and triton.cdiv(out_features, block_n) > ONE_WAVE:
        block_n *= 2
    return block_n


def add_lora_fused(
    y: torch.Tensor,  # [T, out], updated in place
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [L, S * R, in]
    b: torch.Tensor,  # [L, out, R]
    tiles: TileMap,  # the step's tiles of config.block_m rows (kvik_cuda.lora_tiles)
    shard_starts: tuple[int, ...],  # first output column of each of the S <= 3 shards
    config: LoRAKernelConfig,
) -> None:
    """``kvik.lora.compute.add_lora_reference`` as one launch (graph-safe: no host reads)."""
    assert tiles.block_m == config.block_m, "the tile map is cut for another block_m"
    num_tokens, out_features = y.shape
    rank = b.shape[2]
    starts = [*shard_starts[1:], out_features, out_features][:2]
    block_n = fused_block_n(out_features, config)
    programs = tile_programs(num_tokens, config.block_m, a.shape[0])
    _fused_kernel[(programs, triton.cdiv(out_features, block_n))](
        x, a, b, tiles.tiles, tiles.count, y,
        programs, x.shape[1], out_features, rank, starts[0], starts[1],
        x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), y.stride(0), tiles.tiles.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=block_n, BLOCK_K=config.block_k,
        BLOCK_R=max(16, min(triton.next_power_of_2(rank), 64)),
        PRECISION=config.expand_precision, UPCAST=INTERPRETED,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
