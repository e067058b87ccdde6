"""BGMV Triton kernels for the batched LoRA delta (:mod:`kvik.lora.compute`): one program per token row.

The first kernels kvik had; :mod:`kvik_cuda.lora_kernels` picks between them and the tiled
SGMV kernels (:mod:`kvik_cuda.lora_sgmv`) by token count.

One launch of each per projection covers every token row of the step, each under
its own adapter slot read from the per-token ``slots`` index (``-1``: base model,
the program does nothing). Nothing depends on the host knowing which slots are
present, so the kernels run inside captured CUDA graphs: a replay reads whatever
slot indices and slot weights the runner last wrote into their persistent buffers.

    shrink:  s[t, :]  = x[t] @ a[slot_t].T                     [T, S*R] float32
    expand:  y[t, j] += s[t, k(j)*R : (k(j)+1)*R] @ b[slot_t, j]  (k(j): the shard of column j)

Both are one program per (token, block of outputs), the BGMV shape: the slot's
weights are re-read per token (from L2 when tokens share a slot). At small batches
the shrink also splits its reduction over ``in`` (split-K, partial sums added by
the expand in a fixed order: deterministic). Summation is in float32; the delta
is rounded to ``y``'s dtype and added as torch adds (the reference's rounding steps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, s_ptr,
    in_features, num_cols, k_per_split,
    stride_xt, stride_al, stride_ar, stride_ss, stride_st,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, in_features)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + t * stride_xt + ks, mask=ks < k_end, other=0.0).to(tl.float32)
            mask = (cols[:, None] < num_cols) & (ks[None, :] < k_end)
            av = tl.load(a_ptr + slot * stride_al + cols[:, None] * stride_ar + ks[None, :], mask=mask, other=0.0)
            acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
        tl.store(s_ptr + split * stride_ss + t * stride_st + cols, acc, mask=cols < num_cols)


@triton.jit
def _expand_kernel(
    s_ptr, b_ptr, slots_ptr, y_ptr,
    out_features, rank, start1, start2,
    stride_ss, stride_st, stride_bl, stride_bo, stride_yt,
    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        shard = (cols >= start1).to(tl.int64) + (cols >= start2).to(tl.int64)  # 0, 1 or 2
        rs = tl.arange(0, BLOCK_R)
        mask = (cols[:, None] < out_features) & (rs[None, :] < rank)
        offsets = t * stride_st + shard[:, None] * rank + rs[None, :]
        sv = tl.load(s_ptr + offsets, mask=mask, other=0.0)
        for split in tl.static_range(1, SPLIT_K):  # the shrink's split-K partial sums, in a fixed order
            sv += tl.load(s_ptr + split * stride_ss + offsets, mask=mask, other=0.0)
        bv = tl.load(b_ptr + slot * stride_bl + cols[:, None] * stride_bo + rs[None, :], mask=mask, other=0.0)
        delta = tl.sum(sv * bv.to(tl.float32), axis=1).to(y_ptr.dtype.element_ty)
        out_mask = cols < out_features
        yv = tl.load(y_ptr + t * stride_yt + cols, mask=out_mask, other=0.0)
        total = yv.to(tl.float32) + delta.to(tl.float32)
        tl.store(y_ptr + t * stride_yt + cols, total.to(y_ptr.dtype.element_ty), mask=out_mask)


def shrink_splits(num_tokens: int, in_features: int) -> int:
    """Split the shrink's reduction over ``in`` when few tokens would leave most SMs idle (decode at small
    batch: one program per token would walk all of ``in`` alone). A function of shapes only (graph-safe)."""
    if num_tokens >= 128:
        return 1
    return max(1, min(16, in_features // 1024))


def bgmv_shrink(
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [L, S * R, in]
    slots: torch.Tensor,  # [T] int64, -1 = no adapter
    split_k: int = 0,  # reduction splits; 0: shrink_splits(T, in)
) -> torch.Tensor:
    """The shrink's split-K partial sums ``[splits, T, S*R]`` float32 (rows of base-model tokens unwritten)."""
    num_tokens, in_features = x.shape
    num_cols = a.shape[1]
    splits = split_k or shrink_splits(num_tokens, in_features)
    block_k = 128
    k_per_split = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
    splits = triton.cdiv(in_features, k_per_split)
    shrink = torch.empty((splits, num_tokens, num_cols), dtype=torch.float32, device=x.device)
    block_c = min(triton.next_power_of_2(num_cols), 64)
    _shrink_kernel[(num_tokens, triton.cdiv(num_cols, block_c), splits)](
        x, a, slots, shrink,
        in_features, num_cols, k_per_split,
        x.stride(0), a.stride(0), a.stride(1), shrink.stride(0), shrink.stride(1),
        BLOCK_C=block_c, BLOCK_K=block_k,
    )  # fmt: skip
    return shrink


def bgmv_expand(
    y: torch.Tensor,  # [T, out], updated in place
    shrink: torch.Tensor,  # bgmv_shrink's partial sums
    b: torch.Tensor,  # [L, out, R]
    slots: torch.Tensor,  # [T] int64, -1 = no adapter
    shard_starts: tuple[int, ...],  # first output column of each of the S <= 3 shards
) -> None:
    """``y += shrink @ b[slot]`` per row and shard (the partial sums added in split order)."""
    out_features, rank = y.shape[1], b.shape[2]
    starts = [*shard_starts[1:], out_features, out_features][:2]
    block_n = 64
    _expand_kernel[(y.shape[0], triton.cdiv(out_features, block_n))](
        shrink, b, slots, y,
        out_features, rank, starts[0], starts[1],
        shrink.stride(0), shrink.stride(1), b.stride(0), b.stride(1), y.stride(0),
        SPLIT_K=shrink.shape[0], BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(rank),
    )  # fmt: skip


def add_lora_bgmv(
    y: torch.Tensor,  # [T, out], updated in place
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [L, S * R, in]
    b: torch.Tensor,  # [L, out, R]
    slots: torch.Tensor,  # [T] int64, -1 = no adapter
    shard_starts: tuple[int, ...],  # first output column of each of the S <= 3 shards
    split_k: int = 0,  # shrink reduction splits; 0: shrink_splits(T, in)
) -> None:
    """``kvik.lora.compute.add_lora_reference`` as two BGMV launches (graph-safe: no host reads)."""
    if y.shape[0] == 0:
        return
    assert len(shard_starts) <= 3, "at most three shards (q/k/v) per projection"
    assert x.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1 and y.stride(1) == 1
    bgmv_expand(y, bgmv_shrink(x, a, slots, split_k), b, slots, shard_starts)
