"""Deterministic mode on CUDA/ROCm: a batch-invariant Triton GEMM and RMSNorm.

cuBLAS picks a kernel per shape: tile sizes, and for small ``M`` a split-K that sums a
row's partial products in another order, so a row's logits change with the batch it is in.
:func:`invariant_matmul` is a plain tiled GEMM with one tile configuration per *weight*
(chosen from ``N``, ``K`` and the dtype, never from ``M``) and no split-K: every output
element is one program's ``tl.dot`` accumulation over ``K`` in ``BLOCK_K`` steps, in order,
so a row gets the same arithmetic whatever the other rows are, and wherever it sits in
its ``BLOCK_M`` tile (a tensor-core MMA computes each row on its own).

Programs run in grouped order (M-tile fastest within groups of ``GROUP_M`` row tiles), so the
programs that share a weight tile run together and read it once from HBM (the rest hit L2): a
decode step still streams each weight once.

The fused layers (:mod:`kvik_cuda.fused`) are per-row kernels already (one program per
row or token, reduction shape fixed by the hidden size); :class:`InvariantFusedRMSNorm`
only makes the RMSNorm kernel serve 3-D inputs too (Qwen3's per-head q/k norm), which the
fused class leaves to eager PyTorch, whose CUDA reductions are tuned by shape.
Element-wise PyTorch ops on CUDA run the same code for every element: invariant as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvik.layers.activation import SiluAndMul
from kvik.layers.batch_invariant import InvariantKernels
from kvik.layers.norm import RMSNorm
from kvik.layers.rotary import RotaryEmbedding

from kvik_cuda.fused import FusedRMSNorm, FusedRotaryEmbedding, FusedSiluAndMul
from kvik_cuda.sms import num_sms

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
Tile = tuple[int, int, int, int, int]
TILE_16BIT: Tile = (128, 128, 64, 8, 3)
# Narrow outputs (an 8B model's o_proj and down_proj: N = 4096) would leave SMs idle at
# 128 columns per program; 64 columns doubles the programs. Chosen from N, so fixed per weight.
TILE_16BIT_NARROW: Tile = (128, 64, 64, 4, 3)
TILE_FP32: Tile = (64, 64, 32, 4, 2)
GROUP_M = 8  # row tiles per group in the programs' order (L2 reuse; no effect on the arithmetic)


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    a_ptr,  # [M, K]
    b_ptr,  # [N, K] (the weight, read as its transpose)
    bias_ptr,  # [N] or unused
    c_ptr,  # [M, N]
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles at a time, M fastest within a group, so the programs that
    # run together share weight tiles (decode: all rows are one group, each weight tile is read
    # once) and, for long prefills, activation tiles too (both stay in L2). Only the order of
    # programs changes with M, never what a program computes.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:  # added in float32 before the one rounding, as cuBLAS's epilogue does
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def tile_for(n: int, k: int, dtype: torch.dtype, device: torch.device) -> Tile:
    """The tile for a weight ``[n, k]``: a function of the weight alone, never of ``M``."""
    if dtype == torch.float32:
        return TILE_FP32
    if triton.cdiv(n, TILE_16BIT[1]) < num_sms(device):
        return TILE_16BIT_NARROW
    return TILE_16BIT


def invariant_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tile: Tile | None = None
) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T (+ bias)`` in ``x``'s dtype, each row's result independent of ``M``."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"matmul shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m, block_n, block_k, warps, stages = tile or tile_for(n, k, weight.dtype, weight.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _matmul_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=GROUP_M,
        # fp32: exact products (no TF32), like F.linear's default; 16-bit: Triton's default.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=warps,
        num_stages=stages,
    )
    return out


class InvariantFusedRMSNorm(FusedRMSNorm):
    """The fused RMSNorm kernel for inputs of any rank (rows of the last dimension)."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 2 and x.stride(-1) == 1:
            return super().forward(x, residual)
        shape, width = x.shape, x.shape[-1]
        flat = x.reshape(-1, width).contiguous()
        if residual is None:
            out = super().forward(flat)
            assert isinstance(out, torch.Tensor)
            return out.reshape(shape)
        normed, summed = super().forward(flat, residual.reshape(-1, width))
        return normed.reshape(shape), summed.reshape(shape)


def cuda_kernels() -> InvariantKernels:
    """Deterministic mode's kernels on a GPU: the Triton GEMM; RMSNorm always through its fused kernel."""
    return InvariantKernels(
        matmul=invariant_matmul,
        layers={
            RMSNorm: InvariantFusedRMSNorm,
            FusedRMSNorm: InvariantFusedRMSNorm,
            # Element-wise on CUDA (eager or fused): the same code for every element.
            SiluAndMul: SiluAndMul,
            FusedSiluAndMul: FusedSiluAndMul,
            RotaryEmbedding: RotaryEmbedding,
            FusedRotaryEmbedding: FusedRotaryEmbedding,
        },
    )
