"""Triton kernels for 8-bit weights (FP8 e4m3 or INT8, ``[N, K]`` with one float32 scale per output channel).

* :func:`w8a16_gemv` (decode, ``M <= 16``): reads the activations as they are (bf16/fp16) and
  the 8-bit weights, converts the weights in registers and applies the channel scale at the
  end — no activation quantization at all (W8A16), so a decode-step linear is one launch
  instead of two (quantize, then ``torch._scaled_mm`` / ``torch._int_mm``), and it is more
  accurate than W8A8. K-slices are added in the same launch (:mod:`kvik_quant.splitk`).
* :func:`int8_gemm` (batched INT8 W8A8): int8 ``tl.dot`` with int32 accumulation and the
  per-token x per-channel rescale fused into the store, replacing ``torch._int_mm`` (which
  needs more than 16 rows, and whose int32 output then went through four elementwise
  torch kernels over ``[M, N]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvik_quant import device as dev
from kvik_quant import splitk


@dataclass(frozen=True, slots=True)
class W8GemvConfig:
    block_n: int = 32
    block_k: int = 256
    split_k: int = 0  # 0: from the shape (splitk.split_for)
    per_sm: int = 2  # with split_k 0: split until this many programs per SM
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = True  # one row: double-buffer the weight loads in registers
    reduce_each: bool = True  # one row: reduce over k every step (112 registers, not 181, at 32 x 256)
    # One row without prefetch: k-steps per loop iteration, their loads in flight together (the dense one-row
    # GEMV's lesson, kvik_cuda.gemv: a plain loop waits for each step's bytes before issuing the next).
    unroll: int = 1


@dataclass(frozen=True, slots=True)
class Int8GemmConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    tma: bool = False  # _int8_gemm_tma_kernel: operand tiles through the tensor memory accelerator (Hopper)
    split_k: int = 1  # K split over this many programs per output tile (_store_int32_tile adds their sums)


# One row: a program is one warp and a few weight rows, each thread loading 16 consecutive bytes of every row
# (512 k a step), the k-sum reduced once at the end, several steps in flight per iteration: the layout of the
# dense one-row GEMV (kvik_cuda.gemv), whose unrolled steps took the 8B's bf16 batch-1 decode from 4.62 to
# 4.25 ms. Weights with no more rows than columns (o, down) take one row a program and twice the steps.
ROW_CONFIG = W8GemvConfig(block_n=2, block_k=512, per_sm=8, num_warps=1, num_stages=1, prefetch=False,
                          reduce_each=False, unroll=4)  # fmt: skip
WIDE_ROW_CONFIG = dataclasses.replace(ROW_CONFIG, block_n=1, unroll=8)


def _row(block_n: int, unroll: int) -> W8GemvConfig:
    return dataclasses.replace(ROW_CONFIG, block_n=block_n, unroll=unroll)


# Per-shape choices measured on the H200 by benchmarks/quant_kernels_sweep.py (its summary's
# "gemv_tables" prints these entries): (weight dtype name, N, K, one row?) -> config; else the default.
# _row(block_n, unroll) is ROW_CONFIG with those two. Llama-3.1-8B's linears at one row, run u (2026-12-02;
# µs, against the one-row default's):
# FP8 qkv 9.25 (9.47), o 7.90 (7.90), gate_up 33.32 (35.73), down 21.22 (23.79);
# INT8 qkv 9.97 (10.39), o 8.21 (8.57), gate_up 35.18 (37.35), down 23.10 (26.97).
W8_GEMV_TABLE: dict[tuple[str, int, int, bool], W8GemvConfig] = {
    ("float8_e4m3fn", 6144, 4096, True): _row(4, 4),
    ("float8_e4m3fn", 4096, 4096, True): _row(1, 8),
    ("float8_e4m3fn", 28672, 4096, True): _row(2, 8),
    ("float8_e4m3fn", 4096, 14336, True): W8GemvConfig(),  # 32 rows a program, 4 warps, register double-buffering
    ("int8", 6144, 4096, True): _row(4, 4),
    ("int8", 4096, 4096, True): _row(2, 8),
    ("int8", 28672, 4096, True): _row(4, 4),
    ("int8", 4096, 14336, True): _row(2, 4),
}


def w8_gemv_config(n: int, k: int, m: int, weight_dtype: torch.dtype) -> W8GemvConfig:
    """The W8A16 GEMV config for a problem: the measured one for a known shape, else the default for its rows."""
    found = W8_GEMV_TABLE.get((str(weight_dtype).removeprefix("torch."), n, k, m == 1))
    if found is not None:
        return found
    if m == 1:
        return WIDE_ROW_CONFIG if n <= k else ROW_CONFIG
    return W8GemvConfig()


@triton.jit
def _w8_step(w_ptr, x_ptr, k0, k_hi, offs_n, mask_n, K, BLOCK_K: tl.constexpr):
    """The weight tile ``[BLOCK_N, BLOCK_K]`` at column ``k0`` and the activations it meets (masked past ``k_hi``)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k_hi
    w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    x1 = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0)
    return w, x1


@triton.jit
def _to_float(w):
    """8-bit weights to float32. int8 skips the int-to-float convert (a quarter of the FMA rate on Hopper):
    ``q + 128`` in the mantissa of 2**23 (0x4B000000) is the float 2**23 + 128 + q exactly."""
    if w.dtype == tl.int8:
        out = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        out = w.to(tl.float32)
    return out


@triton.jit
def _w8_fma(acc, w, x1, REDUCE_EACH: tl.constexpr):
    """``acc += w . x1`` for a weight tile ``[BLOCK_N, BLOCK_K]`` (8-bit) and one activation row ``[BLOCK_K]``."""
    prod = _to_float(w) * x1.to(tl.float32)[None, :]
    if REDUCE_EACH:  # one return: Triton type-checks every return path, even a dead one
        out = acc + tl.sum(prod, axis=1)
    else:
        out = acc + prod
    return out


@triton.jit
def _k_tiles(K, pid_k, SPLIT_K, BLOCK_K: tl.constexpr):
    """The ``[k_lo, k_hi)`` columns of split ``pid_k``: whole k-tiles, the splits as even as the tiles allow."""
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * per_split
    return k_lo, tl.minimum(K, k_lo + per_split)


@triton.jit(do_not_specialize=["M"])  # one compile for every row count (M = 1 included)
def _w8a16_gemv_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # [N, K] float8_e4m3fn or int8
    ws_ptr,  # [N] float32 channel scales
    out_ptr,  # [M, N]
    part_ptr,  # [SPLIT_K, M, N] float32 partials
    lock_ptr,  # int32 counters
    M,
    N,
    K,
    stride_xm,
    SPLIT_K,
    BLOCK_M: tl.constexpr,  # 1 (elementwise) or 16 (tl.dot)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    IEEE: tl.constexpr,
    PREFETCH: tl.constexpr,  # one-row path: register double-buffering of the weight loads
    REDUCE_EACH: tl.constexpr,  # one-row path: reduce over k every step
    UNROLL: tl.constexpr,  # one-row path without PREFETCH: k-steps per iteration (the same sums in the same order)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    k_lo, k_hi = _k_tiles(K, pid_k, SPLIT_K, BLOCK_K)
    if USE_DOT:  # Triton pipelines these loads itself (they feed a dot)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0.0)  # fmt: skip
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & mask_k[None, :], other=0.0)  # fmt: skip
            wt = tl.trans(_to_float(w).to(x.dtype))  # [BLOCK_K, BLOCK_N]; exact for e4m3 and int8
            if IEEE:
                acc += tl.dot(x, wt, input_precision="ieee")
            else:
                acc += tl.dot(x, wt)
    else:
        # One row, no tensor cores. REDUCE_EACH: reduce over k every step into [BLOCK_N] (few registers);
        # else accumulate a [BLOCK_N, BLOCK_K] register tile, reduced once at the end.
        if REDUCE_EACH:
            acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if PREFETCH:
            # Loads without a dot are not software-pipelined by Triton: load the next tile into registers
            # before this tile's math, so two weight tiles per program are in flight.
            w, x1 = _w8_step(w_ptr, x_ptr, k_lo, k_hi, offs_n, mask_n, K, BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                n_w, n_x1 = _w8_step(w_ptr, x_ptr, k0 + BLOCK_K, k_hi, offs_n, mask_n, K, BLOCK_K)
                acc1 = _w8_fma(acc1, w, x1, REDUCE_EACH)
                w, x1 = n_w, n_x1
        else:
            for k0 in range(k_lo, k_hi, BLOCK_K * UNROLL):
                for u in tl.static_range(UNROLL):  # each step masked on its own: any trip count is right
                    w, x1 = _w8_step(w_ptr, x_ptr, k0 + u * BLOCK_K, k_hi, offs_n, mask_n, K, BLOCK_K)
                    acc1 = _w8_fma(acc1, w, x1, REDUCE_EACH)
        if REDUCE_EACH:
            acc = tl.reshape(acc1, (BLOCK_M, BLOCK_N))
        else:
            acc = tl.reshape(tl.sum(acc1, axis=1), (BLOCK_M, BLOCK_N))
    scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    acc = acc * scale[None, :]  # per channel, so each partial can be scaled before the split-K sum
    splitk.store_tile(acc, out_ptr, part_ptr, lock_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT_K)


def w8a16_gemv(
    x: torch.Tensor,  # [M, K] bf16/fp16/fp32, M <= 16
    weight: torch.Tensor,  # [N, K] float8_e4m3fn or int8
    w_scale: torch.Tensor,  # [N] float32
    num_sms: int,
    config: W8GemvConfig | None = None,
) -> torch.Tensor:
    """``x @ (weight * w_scale[:, None])^T`` ``[M, N]`` in ``x``'s dtype, one launch."""
    cfg = config or w8_gemv_config(weight.shape[0], x.shape[1], x.shape[0], weight.dtype)
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    if m > 16:
        raise ValueError(f"w8a16_gemv handles at most 16 rows, got {m}")
    tiles = triton.cdiv(n, cfg.block_n)
    split_k = cfg.split_k or splitk.split_for(tiles, triton.cdiv(k, cfg.block_k), num_sms, cfg.per_sm)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    part = splitk.scratch(split_k, m, n, x.device)
    locks = splitk.counters(x.device, tiles)
    use_dot = m > 1
    _w8a16_gemv_kernel[(tiles, split_k)](
        x, weight, w_scale, out, part, locks, m, n, k, x.stride(0), split_k,
        BLOCK_M=16 if use_dot else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=use_dot,
        IEEE=x.dtype == torch.float32, PREFETCH=cfg.prefetch and not use_dot,
        REDUCE_EACH=cfg.reduce_each and not use_dot, UNROLL=1 if use_dot or cfg.prefetch else cfg.unroll,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile), GROUP_M row tiles walked together so the weight tiles they share
    stay in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _rescale_store(acc, as_ptr, ws_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, N):
    """The int32 tile times its per-token and per-channel scales, stored in the output dtype."""
    a_scale = tl.load(as_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


@triton.jit
def _store_int32_tile(acc, as_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
                      tile, pid_k, SPLIT_K: tl.constexpr):  # fmt: skip
    """Rescale and store the tile; split over K, each program leaves its int32 partial sum and the last one in
    adds them all, so the integer total (and every output bit) is the unsplit kernel's. The counters follow
    :func:`kvik_quant.splitk.store_tile`'s protocol: zero between calls, reset by the last program."""
    if SPLIT_K == 1:
        _rescale_store(acc, as_ptr, ws_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, N)
    else:
        mask = mask_m[:, None] & mask_n[None, :]
        offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves (release below)
        count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.int32)
            for s in range(0, SPLIT_K):
                total += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0, cache_modifier=".cg")
            _rescale_store(total, as_ptr, ws_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, N)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=["M"])  # one compile for every row count (M = 1 included)
def _int8_gemm_kernel(
    a_ptr,  # [M, K] int8 activations
    as_ptr,  # [M] float32 per-token scales
    w_ptr,  # [N, K] int8 weights
    ws_ptr,  # [N] float32 channel scales
    out_ptr,  # [M, N]
    part_ptr,  # [SPLIT_K, M, N] int32 partial sums (unused when SPLIT_K == 1)
    lock_ptr,  # [>= tiles] int32 counters, zero between calls
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-tiles walked together so the weight tiles they share stay in L2
    SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_lo, k_hi = _k_tiles(K, pid_k, SPLIT_K, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    _store_int32_tile(acc, as_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
                      tl.program_id(0), pid_k, SPLIT_K)  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def _int8_gemm_tma_kernel(
    a_desc,  # [M, K] int8 activations, block [BLOCK_M, BLOCK_K]
    as_ptr,  # [M] float32 per-token scales
    w_desc,  # [N, K] int8 weights, block [BLOCK_N, BLOCK_K]
    ws_ptr,  # [N] float32 channel scales
    out_ptr,  # [M, N]
    part_ptr,  # [SPLIT_K, M, N] int32 partial sums (unused when SPLIT_K == 1)
    lock_ptr,  # [>= tiles] int32 counters, zero between calls
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """:func:`_int8_gemm_kernel` with its operand tiles loaded through tensor descriptors (TMA on Hopper): one
    instruction per tile instead of per-thread address arithmetic and predicated copies; edges padded with 0
    (a split's k-range is whole tiles, so only the last split's last tile reaches past K)."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_lo, k_hi = _k_tiles(K, pid_k, SPLIT_K, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k0])
        w = w_desc.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    _store_int32_tile(acc, as_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
                      tl.program_id(0), pid_k, SPLIT_K)  # fmt: skip


def _tma_ready(xq: torch.Tensor, weight: torch.Tensor) -> bool:
    """A tensor descriptor can address both operands (16-byte aligned rows and bases), on a GPU with TMA (Hopper
    or newer; the interpreter emulates it)."""
    aligned = xq.shape[1] % 16 == 0 and xq.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    return aligned and weight.is_contiguous() and (xq.device.type != "cuda" or dev.has_tma(xq.device))


def int8_gemm(
    xq: torch.Tensor,  # [M, K] int8
    x_scale: torch.Tensor,  # [M, 1] float32
    weight: torch.Tensor,  # [N, K] int8
    w_scale: torch.Tensor,  # [N] float32
    dtype: torch.dtype,
    config: Int8GemmConfig | None = None,
) -> torch.Tensor:
    """``(xq * x_scale) @ (weight * w_scale[:, None])^T`` ``[M, N]`` in ``dtype``, int32 accumulation, one launch."""
    cfg = config or Int8GemmConfig()
    m, k = xq.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=dtype, device=xq.device)
    if m == 0:
        return out
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split_k = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    grid = (tiles, split_k)
    parts = splitk.scratch(split_k, m, n, xq.device, torch.int32)
    locks = splitk.counters(xq.device, tiles)
    xq = xq.contiguous()
    kernel, a, w = _int8_gemm_kernel, xq, weight
    if cfg.tma and _tma_ready(xq, weight):
        from triton.tools.tensor_descriptor import TensorDescriptor

        kernel = _int8_gemm_tma_kernel
        a = TensorDescriptor.from_tensor(xq, [cfg.block_m, cfg.block_k])
        w = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
    kernel[grid](
        a, x_scale.reshape(-1).contiguous(), w, w_scale, out, parts, locks, m, n, k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def int8_gemm_config(m: int, n: int, k: int = 0) -> Int8GemmConfig:
    """Tiles by row count and output width (and depth ``k``, where K is split), all with TMA loads, from the
    H200 sweeps (benchmarks/quant_kernels_sweep.py; µs on the 8B's qkv / o / gate_up / down, bf16 cuBLAS in
    brackets):

    - up to 256 rows: 64x64x128 (64x128x128 at 64 rows, 128x128x128 with 4 warps above, for outputs of 16k
      or wider): 18.7 / 16.3 / 62.3 / 51.5 at 256 rows (21.1 / 17.1 / 91.3 / 48.4) in run a6;
    - up to 256 rows and K at least twice the output width (the down projection): 64x128x128 with K split in 4
      up to 64 rows, in 2 above: 37.3 and 47.2 µs at 64 and 256 rows against 42+ and 52.5 unsplit (run d4,
      2026-12-03; bf16 35.7 / 48.7). No other shape gained from a split;
    - up to 1,024: 64x128x128 for outputs up to 4,096 wide, else 128x128x128 with 4 warps;
    - above: 128x128x128 with 4 warps: 90.7 / 64.0 / 390 / 224 at 2,048 rows (132 / 89 / 671 / 330).
    The same tiles with plain loads were 3-15% slower (13% on qkv at 2,048 rows).
    """
    if m <= 256 and k >= 2 * n:
        return Int8GemmConfig(64, 128, 128, num_warps=4, num_stages=4, tma=True, split_k=4 if m <= 64 else 2)
    if m <= 64:
        return Int8GemmConfig(64, 64 if n < 16384 else 128, 128, num_warps=4, num_stages=4, tma=True)
    if (m <= 256 and n < 16384) or (m <= 1024 and n <= 4096):
        return Int8GemmConfig(64, 64 if m <= 256 else 128, 128, num_warps=4, num_stages=4, tma=True)
    return Int8GemmConfig(128, 128, 128, num_warps=4, num_stages=3, tma=True)
