"""SGMV Triton kernels for the batched LoRA delta (:mod:`kvik.lora.compute`): tiled, on the tensor cores.

The same two steps as the BGMV kernels (:mod:`kvik_cuda.lora_bgmv`),

    shrink:  s[t, :]  = x[t] @ a[slot_t].T                     [T, S*R] float32 (split-K, summed in-launch)
    expand:  y[t, j] += s[t, k(j)*R : (k(j)+1)*R] @ b[slot_t, j]  (k(j): the shard of column j)

but each program owns a tile of at most ``BLOCK_M`` adjacent token rows that share one adapter slot
(:mod:`kvik_cuda.lora_tiles`: the step's tile map, built once per step from the per-token slots) and
computes it with ``tl.dot`` (float32 accumulation) in one pass over that slot's weights. Base-model
rows (``-1``) belong to no tile and cost nothing. The scheduler groups a step's rows by adapter, so
a tile is full unless its adapter's rows run out; rows in any other order are still exact (more,
smaller tiles, walked grid-stride by the fixed number of programs). Nothing is read on the host:
the kernels stay valid inside captured CUDA graphs.

Rounding is the reference's: the delta is summed in float32 (the expand's float32 dot runs at
``PRECISION``, "ieee" by default), rounded to ``y``'s dtype, and added as torch adds two
tensors of that dtype (in float32, rounded once).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kvik_cuda.gemv import completion_counters, last_to_arrive, reset
from kvik_cuda.lora_tiles import TileMap, tile_programs
from kvik_cuda.sms import num_sms

if TYPE_CHECKING:
    from kvik_cuda.lora_kernels import LoRAKernelConfig

# Under Triton's CPU interpreter (tests) the shrink's bf16 dot runs on float32 copies (exact products either way).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Programs the shrink aims for when it picks its own split-K (two per SM of an H100/H200).
TARGET_PROGRAMS = 264
MAX_SPLIT_ROWS = 2048


@triton.jit
def tile_rows(tiles_ptr, stride_tiles, tile, BLOCK_M: tl.constexpr):
    """Tile ``tile`` of the step's map (kvik_cuda.lora_tiles): its row indices (int64), which of them are rows,
    and its adapter slot."""
    first = tl.load(tiles_ptr + tile)
    row_ok = tl.arange(0, BLOCK_M) < tl.load(tiles_ptr + stride_tiles + tile)
    slot = tl.load(tiles_ptr + 2 * stride_tiles + tile).to(tl.int64)
    return (first + tl.arange(0, BLOCK_M)).to(tl.int64), row_ok, slot


@triton.jit
def column_shards(cols, col_ok, start1, start2):
    """Each output column's shard (0, 1 or 2; shards start at 0, ``start1``, ``start2``) and the first and last
    shard the block meets: usually one (real shard sizes are multiples of the block)."""
    shard = (cols >= start1).to(tl.int32) + (cols >= start2).to(tl.int32)
    return shard, tl.min(tl.where(col_ok, shard, 3), axis=0), tl.max(tl.where(col_ok, shard, -1), axis=0)


@triton.jit
def add_delta(y_ptr, stride_yt, rows64, row_ok, cols, col_ok, acc):
    """``y[rows, cols] += acc`` as the reference does it: the float32 delta rounded to y's dtype, then added
    (in float32, rounded once)."""
    out_mask = row_ok[:, None] & col_ok[None, :]
    y_ptrs = y_ptr + rows64[:, None] * stride_yt + cols[None, :]
    yv = tl.load(y_ptrs, mask=out_mask, other=0.0)
    delta = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, (yv.to(tl.float32) + delta.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_programs", "splits"])  # one compile for every row count (T=1 included)
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, tiles_ptr, count_ptr, s_ptr, lock_ptr,
    num_programs, in_features, num_cols, k_per_split, splits,
    stride_xt, stride_al, stride_ar, stride_ss, stride_st, stride_tiles,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    # Grid-stride over the map: one tile per program when the step's rows are grouped by slot.
    for tile in range(tl.program_id(0), tl.load(count_ptr), num_programs):
        rows64, row_ok, slot = tile_rows(tiles_ptr, stride_tiles, tile, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_end
            x_mask = row_ok[:, None] & k_ok[None, :]
            xv = tl.load(x_ptr + rows64[:, None] * stride_xt + ks[None, :], mask=x_mask, other=0.0)
            a_mask = k_ok[:, None] & (cols[None, :] < num_cols)
            av = tl.load(a_ptr + slot * stride_al + cols[None, :] * stride_ar + ks[:, None], mask=a_mask, other=0.0)
            av = av.to(xv.dtype)
            if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly; float32 products are the same
                xv, av = xv.to(tl.float32), av.to(tl.float32)
            acc = tl.dot(xv, av, acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_C]
        out_mask = row_ok[:, None] & (cols[None, :] < num_cols)
        s_ptrs = s_ptr + rows64[:, None] * stride_st + cols[None, :]
        tl.store(s_ptrs + split * stride_ss, acc, mask=out_mask)
        # The last split to finish this (tile, column block) adds the partial sums in split order into split 0's
        # place: the expand then reads one sum per item, not every split's partial once per output block
        # (a decode step of 96 rows under 64 adapters splits the reduction 16 ways).
        if splits > 1:
            lock = lock_ptr + tile * tl.num_programs(1) + tl.program_id(1)
            if last_to_arrive(lock, splits):
                total = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
                for other in range(0, splits):  # fixed order: deterministic
                    total += tl.load(s_ptrs + other * stride_ss, mask=out_mask, other=0.0, cache_modifier=".cg")
                tl.store(s_ptrs, total, mask=out_mask)
                reset(lock)


@triton.jit(do_not_specialize=["num_programs"])
def _sgmv_expand_kernel(
    s_ptr, b_ptr, tiles_ptr, count_ptr, y_ptr,
    num_programs, out_features, rank, start1, start2,
    stride_st, stride_bl, stride_bo, stride_yt, stride_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # Work items are (tile, column block), tile-major, walked grid-stride by the launched programs: one item
    # each when the grid covers them all, several when the config caps the grid at a few programs per SM.
    # With a few rows per tile (many adapters) an item is little work, and a program per item paid its
    # launch, the tile lookup and the latency of its loads alone (run j: 64 adapters x 4 rows, 8B gate_up,
    # 212 -> 87 us).
    col_blocks = tl.cdiv(out_features, BLOCK_N)
    for item in range(tl.program_id(0), tl.load(count_ptr) * col_blocks, num_programs):
        rows64, row_ok, slot = tile_rows(tiles_ptr, stride_tiles, item // col_blocks, BLOCK_M)
        cols = (item % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        shard, first_shard, last_shard = column_shards(cols, col_ok, start1, start2)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(first_shard, last_shard + 1):
            in_shard = col_ok & (shard == k)
            for r0 in range(0, rank, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                r_ok = rs < rank
                offsets = rows64[:, None] * stride_st + k * rank + rs[None, :]
                s_mask = row_ok[:, None] & r_ok[None, :]
                sv = tl.load(s_ptr + offsets, mask=s_mask, other=0.0)
                b_mask = r_ok[:, None] & in_shard[None, :]
                b_ptrs = b_ptr + slot * stride_bl + cols[None, :] * stride_bo + rs[:, None]
                bv = tl.load(b_ptrs, mask=b_mask, other=0.0)
                acc = tl.dot(sv, bv.to(tl.float32), acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        add_delta(y_ptr, stride_yt, rows64, row_ok, cols, col_ok, acc)


def sgmv_splits(num_tokens: int, in_features: int, num_cols: int, config: LoRAKernelConfig) -> int:
    """The shrink's split-K: the config's, or enough splits to give the GPU ~TARGET_PROGRAMS programs
    while each keeps at least two ``block_k`` steps of the reduction, and at most MAX_SPLIT_ROWS
    partial-sum rows (the last split of a tile re-reads them all: that cost grows with splits x tokens).
    A function of shapes only (graph-safe)."""
    if config.split_k > 0:
        return config.split_k
    programs = triton.cdiv(num_tokens, config.block_m) * triton.cdiv(num_cols, shrink_block_c(num_cols, config))
    limit = min(in_features // (2 * config.block_k), MAX_SPLIT_ROWS // num_tokens, 32)
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), limit))


def shrink_block_c(num_cols: int, config: LoRAKernelConfig) -> int:
    """The shrink's output-column tile: the config's, no wider than the S*R columns need (tl.dot wants >= 16)."""
    return max(16, min(config.block_c, triton.next_power_of_2(num_cols)))


def sgmv_shrink(
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [L, S * R, in]
    tiles: TileMap,  # the step's tiles of config.block_m rows (kvik_cuda.lora_tiles)
    config: LoRAKernelConfig,
) -> torch.Tensor:
    """The shrink ``[T, S*R]`` float32 (base-model rows never written): split 0 of the split-K buffer, where the
    last split of each (tile, column block) leaves the sum of all of them."""
    assert tiles.block_m == config.block_m, "the tile map is cut for another block_m"
    num_tokens, in_features = x.shape
    num_cols = a.shape[1]
    programs = tile_programs(num_tokens, config.block_m, a.shape[0])
    block_c = shrink_block_c(num_cols, config)
    splits = sgmv_splits(num_tokens, in_features, num_cols, config)
    k_per_split = triton.cdiv(triton.cdiv(in_features, splits), config.block_k) * config.block_k
    splits = triton.cdiv(in_features, k_per_split)
    shrink = torch.empty((splits, num_tokens, num_cols), dtype=torch.float32, device=x.device)
    # A float32 model's shrink must not drop to tf32; bf16/fp16 operands ignore the setting.
    col_blocks = triton.cdiv(num_cols, block_c)
    # Counters per (tile, column block); ungrouped rows make at most a tile per row.
    locks = completion_counters(x.device, num_tokens * col_blocks, pool="lora")
    _sgmv_shrink_kernel[(programs, col_blocks, splits)](
        x, a, tiles.tiles, tiles.count, shrink, locks,
        programs, in_features, num_cols, k_per_split, splits,
        x.stride(0), a.stride(0), a.stride(1), shrink.stride(0), shrink.stride(1), tiles.tiles.stride(0),
        BLOCK_M=config.block_m, BLOCK_C=block_c, BLOCK_K=config.block_k, PRECISION="ieee", UPCAST=INTERPRETED,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return shrink[0]


def sgmv_expand(
    y: torch.Tensor,  # [T, out], updated in place
    shrink: torch.Tensor,  # sgmv_shrink's [T, S*R]
    b: torch.Tensor,  # [L, out, R]
    tiles: TileMap,
    shard_starts: tuple[int, ...],  # first output column of each of the S <= 3 shards
    config: LoRAKernelConfig,
) -> None:
    """``y += shrink @ b[slot]`` per tile and shard."""
    num_tokens, out_features = y.shape
    rank = b.shape[2]
    starts = [*shard_starts[1:], out_features, out_features][:2]
    block_r = max(16, min(triton.next_power_of_2(rank), 64))
    items = tile_programs(num_tokens, config.block_m, b.shape[0]) * triton.cdiv(out_features, config.block_n)
    programs = min(items, config.expand_per_sm * num_sms(y.device)) if config.expand_per_sm else items
    _sgmv_expand_kernel[(programs,)](
        shrink, b, tiles.tiles, tiles.count, y,
        programs, out_features, rank, starts[0], starts[1],
        shrink.stride(0), b.stride(0), b.stride(1), y.stride(0), tiles.tiles.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=block_r, PRECISION=config.expand_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def add_lora_sgmv(
    y: torch.Tensor,  # [T, out], updated in place
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [L, S * R, in]
    b: torch.Tensor,  # [L, out, R]
    tiles: TileMap,  # the step's tiles of config.block_m rows (kvik_cuda.lora_tiles)
    shard_starts: tuple[int, ...],  # first output column of each of the S <= 3 shards
    config: LoRAKernelConfig,
) -> None:
    """``kvik.lora.compute.add_lora_reference`` as two SGMV launches (graph-safe: no host reads)."""
    sgmv_expand(y, sgmv_shrink(x, a, tiles, config), b, tiles, shard_starts, config)
