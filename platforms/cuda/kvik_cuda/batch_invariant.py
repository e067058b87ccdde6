"""Deterministic mode on CUDA/ROCm: a batch-invariant Triton GEMM and RMSNorm.

cuBLAS picks a kernel per shape: tile sizes, and for small ``M`` a split-K that sums a
row's partial products in another order, so a row's logits change with the batch it is in.
:func:`invariant_matmul` is a plain tiled GEMM without split-K: every output element is one
program's ``tl.dot`` accumulation over ``K``, in order, so a row gets the same arithmetic
whatever the other rows are, and wherever it sits in its ``BLOCK_M`` tile (a tensor-core MMA
computes each row on its own).

The 16-bit tile may follow ``M`` (:func:`tile_for`), because a tile does not change that
arithmetic either: whatever ``BLOCK_M``, ``BLOCK_N`` and ``BLOCK_K`` (a multiple of 16), a
program feeds an element's float32 accumulator the same chain of 16-deep tensor-core MMAs in
``k`` order; the tile only decides how the output is cut into programs and how loads are
pipelined, and so does loading the tiles through TMA (:func:`_matmul_tma_kernel`, Hopper).
``benchmarks/invariant_gemm_sweep.py`` and a GPU test check every tile this module can pick,
with either kind of load, against each other, bit for bit. float32 (exact products, no tensor
cores) keeps one tile.

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
from triton.runtime.errors import OutOfResources

from kvik_cuda.fused import FusedRMSNorm, FusedRotaryEmbedding, FusedSiluAndMul
from kvik_cuda.sms import has_tma

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
Tile = tuple[int, int, int, int, int]
# The tiles by rows, and whether the operand tiles load through TMA (tensor descriptors), measured on the H200
# against each other on the 8B shapes (benchmarks/invariant_gemm_sweep.py, 2026-12-02 runs a2 and a6):
# - up to 64 rows (small decode steps): 64x128 tiles with 128-deep k-steps and 4 warps, plain loads: o_proj
#   29.1 us at one row against 41.9 for the tile before (TMA loads were slower here on o, gate_up and the head);
# - above 512 rows (prefill): 256x128, 8 warps, TMA: the best on every 8B shape at 2,048 and 8,192 rows (qkv
#   149 us at 2,048 rows, 240 for the tile before, 185 with plain loads; cuBLAS 134);
# - in between (large decode batches) it depends on how the shape fills the SMs: TILES_MID has the measured
#   best for the 8B's narrower weights; the rest take 128x128x64 with TMA, the best for the wide ones (gate_up
#   107.0 us at 256 rows against 131.7 for the tile before, cuBLAS 99.0; lm_head 435.4, 549.8, 404.6).
TILE_SMALL_M: Tile = (64, 128, 128, 4, 3)
TILE_LARGE_M: Tile = (256, 128, 64, 8, 3)
TILE_16BIT: Tile = (128, 128, 64, 8, 3)
TILES_MID: dict[tuple[int, int], tuple[Tile, bool]] = {  # (N, K) -> (tile, TMA) for 65..512 rows; µs at 256 rows
    (6144, 4096): ((64, 64, 64, 4, 4), True),  # qkv: 34.2 (48.7 with the tile before; cuBLAS 26.8)
    (4096, 4096): ((64, 128, 128, 4, 3), False),  # o: 30.0 (42.6; 23.8)
    (4096, 14336): ((64, 128, 128, 4, 3), True),  # down: 72.5 (121.6; 53.1)
}
SMALL_M, LARGE_M = 64, 512
TILE_FP32: Tile = (64, 64, 32, 4, 2)
GROUP_M = 8  # row tiles per group in the programs' order (L2 reuse; no effect on the arithmetic)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) in grouped order: GROUP_M row tiles at a time, M fastest within a
    group, so the programs that run together share weight tiles (decode: all rows are one group, each weight
    tile is read once) and, for long prefills, activation tiles too (both stay in L2). Only the order of
    programs changes with M, never what a program computes."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


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
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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


@triton.jit(do_not_specialize=["M"])
def _matmul_tma_kernel(
    a_desc,  # [M, K], block [BLOCK_M, BLOCK_K]
    b_desc,  # [N, K] (the weight), block [BLOCK_N, BLOCK_K]
    bias_ptr,  # [N] or unused
    c_ptr,  # [M, N] contiguous
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """:func:`_matmul_kernel` (16-bit) with its operand tiles loaded through tensor descriptors (TMA on Hopper):
    the same MMAs in the same order, so the same bits; edges come zero-padded like the masked loads'."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k0])
        b = b_desc.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(a, b.T, acc)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & n_ok[None, :])  # fmt: skip


def tile_for(n: int, k: int, m: int, dtype: torch.dtype) -> tuple[Tile, bool]:
    """The tile for ``[m, k] x weight[n, k]^T`` and whether to load it through TMA. It may depend on ``m``: every
    16-bit tile, with either kind of load, gives the same bits."""
    if dtype == torch.float32:
        return TILE_FP32, False
    if m <= SMALL_M:
        return TILE_SMALL_M, False
    if m > LARGE_M:
        return TILE_LARGE_M, True
    return TILES_MID.get((n, k), (TILE_16BIT, True))


def invariant_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tile: Tile | None = None,
    tma: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``x [M, K] @ weight[N, K].T (+ bias)`` in ``x``'s dtype, each row's result independent of ``M``.

    ``tile`` (and ``tma``: load it through tensor descriptors where they can address the operands) overrides
    :func:`tile_for`'s choice; for sweeps and tests.
    """
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"matmul shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    chosen, tma = (tile, tma) if tile is not None else tile_for(n, k, m, weight.dtype)
    try:
        if tma and _tma_ready(x, weight):
            _launch_tma(x, weight, bias, out, chosen)
        else:
            _launch(x, weight, bias, out, chosen)
    except OutOfResources:
        # A GPU with less shared memory than a Hopper (the large tiles take up to 144 KiB): the small tile, which
        # gives the same bits (the module docstring says why).
        if tile is not None or chosen == TILE_SMALL_FALLBACK:
            raise
        _launch(x, weight, bias, out, TILE_SMALL_FALLBACK)
    return out


TILE_SMALL_FALLBACK: Tile = (64, 64, 64, 4, 2)  # 32 KiB of shared memory


def _tma_ready(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """16-bit operands a tensor descriptor can address: rows contiguous, 16-byte aligned rows and bases."""
    return (
        x.dtype != torch.float32
        and has_tma(x.device)
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and (x.stride(0) * x.element_size()) % 16 == 0
        and (weight.stride(0) * weight.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


def _launch_tma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, tile: Tile) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    (m, k), n = x.shape, weight.shape[0]
    block_m, block_n, block_k, warps, stages = tile
    _matmul_tma_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        bias if bias is not None else weight, out, m, n, k, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, tile: Tile) -> None:
    (m, k), n = x.shape, weight.shape[0]
    block_m, block_n, block_k, warps, stages = tile
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
