"""The Triton INT4 dequantize-in-GEMM kernel over kvik's INT4 layout (:mod:`kvik_quant.int4_pack`), and the dispatch.

:func:`int4_matmul` picks one of three paths by the number of rows (:func:`plan`): the GEMV
of :mod:`kvik_quant.int4_gemv_kernel` for decode, this kernel in between, and
dequantize-then-cuBLAS for prefill-sized batches.

``y[M, N] = x[M, K] @ W^T`` where ``W^T[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]``
is rebuilt tile by tile in registers from the packed int32 words: each weight byte is read
from memory once, which is the point at decode batch sizes (a quarter of bf16's bytes).

When a problem has too few output tiles to occupy every SM, this kernel splits K across
programs; the partial sums go to a float32 ``[SPLIT_K, M, N]`` buffer and are added by torch
afterwards (deterministic, unlike atomics; the GEMV adds its own in-kernel instead). Runs
under ``TRITON_INTERPRET=1`` on the CPU, which is how CI checks it against the torch reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvik_quant import fallback, splitk
from kvik_quant.int4_gemv_kernel import nibble_to_float, unpack_codes

logger = logging.getLogger(__name__)


@triton.jit(do_not_specialize=["M"])  # one compile for every row count (M = 1 included)
def _int4_gemm_kernel(
    x_ptr,  # [M, K] activations
    qw_ptr,  # [K/8, N] int32
    s_ptr,  # [K/G, N] scales
    z_ptr,  # [K/G, N] zeros
    out_ptr,  # [SPLIT_K, M, N] float32 partial sums, or [M, N] in the output dtype when SPLIT_K == 1
    M,
    N,
    K,
    stride_xm,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP, so one k-tile lies in one group
    SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,  # float32 activations: exact products (no TF32)
    WIDE_LOAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        if WIDE_LOAD:  # each word loaded once, its eight nibbles spread over eight k rows in registers
            offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            codes = unpack_codes(words, BLOCK_K, BLOCK_N)
        else:  # eight neighbouring k rows load the same word (the repeats hit the cache)
            words = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            codes = nibble_to_float((words >> ((offs_k[:, None] % 8) * 4)) & 0xF)  # [BLOCK_K, BLOCK_N]
        group = k0 // GROUP
        scale = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = ((codes - zero[None, :]) * scale[None, :]).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        base = out_ptr + pid_k * M * N
        tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


# Which path runs a problem of M rows (a pure function of the shape; benchmarks/quant_kernels_sweep.py
# measures every path on the H200 and reports the best: update these from its output).
GEMV_MAX_ROWS = 16  # M <= this: int4_gemv (one launch, split-K reduced in-kernel)
DEQUANT_MIN_ROWS = 128  # M >= this: dequantize W once per call into bf16 scratch, then cuBLAS


def plan(m: int) -> str:
    """``"gemv"``, ``"gemm"`` (dequantize-in-GEMM, :func:`_int4_gemm_kernel`) or ``"dequant"`` for ``M`` rows."""
    if m <= GEMV_MAX_ROWS:
        return "gemv"
    return "dequant" if m >= DEQUANT_MIN_ROWS else "gemm"


def gemm_config(m: int, n: int, k: int, group: int, num_sms: int) -> GemmConfig:
    """Tiles for the dequantize-in-GEMM kernel: GEMV-shaped problems split K to fill the GPU."""
    block_k = splitk.pow2_divisor(64, group, k)  # tl.dot needs >= 16: int4_matmul checks
    if m <= 16:
        block_m, block_n, warps = 16, 64, 4
    elif m <= 64:
        block_m, block_n, warps = 32, 64, 4
    else:
        block_m, block_n, warps = 64, 128, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = splitk.split_for(tiles, triton.cdiv(k, block_k), num_sms)
    return GemmConfig(block_m, block_n, block_k, split_k, num_warps=warps)


def int4_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K/8, N] int32
    scales: torch.Tensor,  # [K/G, N]
    zeros: torch.Tensor,  # [K/G, N]
    group: int,
    path: str | None = None,  # None: plan(M); the sweep and tests force one
) -> torch.Tensor:
    """``x @ W^T`` in ``x``'s dtype, ``[M, N]``, by the path :func:`plan` picks for ``M``."""
    from kvik_quant.int4_gemv_kernel import int4_dequantize, int4_gemv

    x = x.contiguous()
    num_sms = splitk.num_sms(x.device)
    path = path or plan(x.shape[0])
    if splitk.pow2_divisor(16, group, x.shape[1]) < 16:
        path = "dequant"  # K or a per-channel group not a multiple of 16: too thin a k-tile for tl.dot
    cfg = gemm_config(x.shape[0], qweight.shape[1], x.shape[1], group, num_sms)

    def gemm() -> torch.Tensor:
        return int4_gemm(x, qweight, scales, zeros, group, cfg)

    if path == "gemv":
        return fallback.run("int4 gemv", lambda: int4_gemv(x, qweight, scales, zeros, group, num_sms), gemm)
    if path == "dequant":

        def dequant() -> torch.Tensor:
            return torch.matmul(x, int4_dequantize(qweight, scales, zeros, group, x.dtype))

        return fallback.run("int4 dequantize", dequant, gemm)
    return gemm()


def int4_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, cfg: GemmConfig
) -> torch.Tensor:
    """The dequantize-in-GEMM kernel with explicit tiles (split-K partials added by torch)."""
    m, k = x.shape
    n = qweight.shape[1]
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    if cfg.split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device)
    global _wide_load
    try:
        _launch(grid, x, qweight, scales, zeros, out, m, n, k, group, cfg, _wide_load)
    except Exception:
        if not _wide_load:
            raise
        # The register reshape of the wide load is the less portable form: keep the simple one from now on.
        logger.warning("INT4 kernel: the wide-load variant failed here; using the per-row-load one", exc_info=True)
        _wide_load = False
        _launch(grid, x, qweight, scales, zeros, out, m, n, k, group, cfg, False)
    return out if cfg.split_k == 1 else out.sum(dim=0).to(x.dtype)


_wide_load = True  # set False (process-wide) if the wide-load variant fails to compile here


def _launch(grid: tuple[int, int, int], x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor, out: torch.Tensor, m: int, n: int, k: int, group: int, cfg: GemmConfig,
            wide_load: bool) -> None:  # fmt: skip
    _int4_gemm_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        out,
        m,
        n,
        k,
        x.stride(0),
        GROUP=group,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        IEEE=x.dtype == torch.float32,
        WIDE_LOAD=wide_load,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
