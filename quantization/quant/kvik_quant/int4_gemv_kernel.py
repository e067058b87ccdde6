"""INT4 kernels for the two ends of the batch range: GEMVs for decode, a whole-weight dequantizer for prefill.

* :func:`int4_gemv` (``M <= 16``), one launch, the K-slices added by :mod:`kvik_quant.splitk` inside it:
  - one row (:func:`_int4_gemv_row_kernel`): a warp per 128 columns, each thread four columns (one
    16-byte load per packed row) and every k row of a step, so the k-sum never leaves its registers;
    two codes per ``lop3``, widened to float32 by ``cvt`` (inline PTX), one FFMA per weight;
  - 2..16 rows (:func:`_int4_gemv_kernel`): the words dequantized into a ``[BLOCK_K, BLOCK_N]`` tile that
    feeds ``tl.dot`` with a 16-row activation tile.
* :func:`int4_dequantize` (large ``M``): the packed weight to a bf16/fp16 ``W^T`` ``[K, N]`` in one
  memory-bound pass, after which cuBLAS does the matmul; at prefill sizes the pass costs less
  than the gap between a register-dequantizing GEMM and cuBLAS.

All run under ``TRITON_INTERPRET=1`` (CI checks them against the torch reference); the row kernel's PTX has a
plain-Triton twin there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvik_quant import device as dev
from kvik_quant import splitk


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int = 64
    block_k: int = 128
    split_k: int = 0  # 0: chosen from the shape (splitk.split_for)
    per_sm: int = 2  # with split_k 0: split until this many programs per SM
    num_warps: int = 4
    num_stages: int = 3


# Per-shape choices measured on the H200 by benchmarks/quant_kernels_sweep.py (its summary's
# "gemv_tables" prints these entries): (N, K, one row?) -> config. Shapes not listed use the defaults below.
GEMV_TABLE: dict[tuple[int, int, bool], GemvConfig] = {}

# One row: a warp per 128 columns, 128-row k-steps, split until 8 programs per SM. Best of the sweep on every
# 8B shape (2026-12-01, H200: 9.9 / 8.7 / 24.0 / 17.8 us for qkv / o / gate_up / down; 2.4x bf16 on gate_up).
ROW_DEFAULT = GemvConfig(block_n=128, block_k=128, per_sm=8, num_warps=1, num_stages=1)
# Rows from 2 up to which int4_gemv runs _int4_gemv_rows_kernel (at most 4); more run the tl.dot kernel. H200 sweep
# (2026-12-01, run i): at 2 rows it takes 12.1 / 10.5 / 38.6 / 22.2 us for the 8B's qkv / o / gate_up / down against
# the tl.dot kernel's 18.8 / 13.8 / 57.6 / 34.7 (bf16: 16.2 / 13.3 / 61.4 / 32.0); at 4 rows it loses (21.9 against
# 19.0 on qkv): each row adds a full set of FMAs per weight decoded, the tl.dot kernel's rows are nearly free.
ROW_MAX_ROWS = 2
# Its config: two warps per 256 columns, K split as for 128-row steps (the kernel steps 64 rows at a time); the
# best of that sweep on qkv / o / down, 4% off on gate_up (the sweep's "rows:256x64:sauto8:w2").
ROWS_DEFAULT = GemvConfig(block_n=256, block_k=128, per_sm=8, num_warps=2, num_stages=1)


def gemv_config(n: int, k: int, m: int) -> GemvConfig:
    """The GEMV config for an ``[M, K] x [K, N]`` problem: the measured one for a known shape, else the default."""
    return GEMV_TABLE.get((n, k, m == 1), ROW_DEFAULT if m == 1 else GemvConfig())


@triton.jit
def _load_step(qw_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed words ``[BLOCK_K/8, BLOCK_N]`` of k rows ``k0..`` and their group's scale and zero."""
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    group = k0 // GROUP
    scale = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return words, scale, zero


@triton.jit
def _k_range(K, SPLIT_K, BLOCK_K: tl.constexpr):
    """``[k_lo, k_hi)``: this program's share of K (program axis 1), whole BLOCK_K steps (K is a multiple)."""
    per_split = tl.cdiv(K // BLOCK_K, SPLIT_K)
    k_lo = tl.program_id(1) * per_split * BLOCK_K
    return k_lo, tl.minimum(K, k_lo + per_split * BLOCK_K)


@triton.jit
def nibble_to_float(nibbles):
    """4-bit codes (int32 in 0..15) to float32 without an int-to-float convert.

    The convert runs at a quarter of the FMA rate on Hopper; with one per weight the one-row GEMV
    was bound by it (41.8 us for the 8B gate_up where streaming its weight takes 14). OR-ing a code
    into the mantissa of 2**23 (0x4B000000) gives the float 2**23 + code exactly; one add takes
    2**23 off again.
    """
    return (nibbles | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def unpack_codes(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_K/8, BLOCK_N]`` words -> float32 codes ``[BLOCK_K, BLOCK_N]``: nibble j of a word is k row 8r+j."""
    shifts = tl.arange(0, 8) * 4
    return nibble_to_float(tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N)))


@triton.jit
def _dequant(words, scale, zero, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The float32 ``W^T`` tile ``[BLOCK_K, BLOCK_N]``: ``code * scale - zero * scale`` (one FMA per weight)."""
    return unpack_codes(words, BLOCK_K, BLOCK_N) * scale[None, :] - (zero * scale)[None, :]


# The one-row kernel dequantizes two codes per instruction. Slots s and s + 4 of a word sit at bits 4s and
# 16 + 4s; one lop3 masks a pair and ORs it into the mantissas of the fp16 pair (1024, 1024), and one cvt per
# half widens each to float32 (HADD2.F32, on the FMA pipe, not the half-rate integer pipe). fp16's 10-bit
# mantissa holds a code at bits 0-3 (1024 + code) or 4-7 (1024 + 16 code), so slots 0 and 1 come straight from
# the word and slots 2 and 3 from one shift of it by 8: one shift per word, not three.
def _pair_asm(mask: int, exact: bool) -> str:
    sub = "sub.f16x2 t, t, m;\n" if exact else ""  # exact: take the 1024 off in fp16 (one more instruction)
    return (
        "{\n.reg .b32 t, m;\n.reg .b16 l, h;\nmov.b32 m, 0x64006400;\n"
        f"lop3.b32 t, $2, {mask:#010x}, m, 0xEA;\n{sub}"
        "mov.b32 {l, h}, t;\ncvt.f32.f16 $0, l;\ncvt.f32.f16 $1, h;\n}"
    )


_ASM_LOW = tl.constexpr(_pair_asm(0x000F000F, exact=False))
_ASM_HIGH = tl.constexpr(_pair_asm(0x00F000F0, exact=False))
_ASM_LOW_EXACT = tl.constexpr(_pair_asm(0x000F000F, exact=True))
_ASM_HIGH_EXACT = tl.constexpr(_pair_asm(0x00F000F0, exact=True))


@triton.jit
def _pair_codes(src, HIGH: tl.constexpr, OFFSET: tl.constexpr, USE_ASM: tl.constexpr):
    """float32 ``OFFSET + code * (16 if HIGH else 1)`` of the nibbles at bits 0-3 and 16-19 of ``src`` (4-7 and
    20-23 when ``HIGH``).

    ``OFFSET`` is 1024 (the fp16 exponent left in place) or 0 (a ``sub.f16x2`` more: exact codes, for float32
    activations). The interpreter cannot run PTX: ``USE_ASM=False`` computes the same values in plain Triton.
    """
    if USE_ASM:
        if HIGH:
            if OFFSET == 0:
                asm: tl.constexpr = _ASM_HIGH_EXACT
            else:
                asm: tl.constexpr = _ASM_HIGH
        elif OFFSET == 0:
            asm: tl.constexpr = _ASM_LOW_EXACT
        else:
            asm: tl.constexpr = _ASM_LOW
        lo, hi = tl.inline_asm_elementwise(asm, "=r,=r,r", [src], dtype=(tl.float32, tl.float32), is_pure=True,
                                           pack=1)  # fmt: skip
    else:
        mask = 0xF0 if HIGH else 0xF
        lo = (src & mask).to(tl.float32) + OFFSET
        hi = ((src >> 16) & mask).to(tl.float32) + OFFSET
    return lo, hi


@triton.jit
def _x_pairs(x_ptr, rows, X_KIND: tl.constexpr):
    """The eight activations ``x[rows + j]`` (``rows`` multiples of 8) as float32, four 4-byte loads for 16-bit x.

    ``X_KIND``: 0 bfloat16, 1 float16, 2 float32.
    """
    if X_KIND == 2:
        x0 = tl.load(x_ptr + rows + 0)
        x1 = tl.load(x_ptr + rows + 1)
        x2 = tl.load(x_ptr + rows + 2)
        x3 = tl.load(x_ptr + rows + 3)
        x4 = tl.load(x_ptr + rows + 4)
        x5 = tl.load(x_ptr + rows + 5)
        x6 = tl.load(x_ptr + rows + 6)
        x7 = tl.load(x_ptr + rows + 7)
    else:
        words = x_ptr.to(tl.pointer_type(tl.int32)) + rows // 2
        x0, x1 = _halves(tl.load(words + 0), X_KIND)
        x2, x3 = _halves(tl.load(words + 1), X_KIND)
        x4, x5 = _halves(tl.load(words + 2), X_KIND)
        x6, x7 = _halves(tl.load(words + 3), X_KIND)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _halves(word, X_KIND: tl.constexpr):
    """The two 16-bit floats of an int32 (low half first) as float32."""
    if X_KIND == 0:  # bfloat16 is float32's top half: place it there
        lo = (word << 16).to(tl.float32, bitcast=True)
        hi = (word & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((word >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _decode(words, OFFSET: tl.constexpr, USE_ASM: tl.constexpr):
    """A step's codes as float32 pairs of slots (0, 4), (1, 5), (2, 6), (3, 7): slots 0 and 1 come straight
    from the word, 2 and 3 from one shift by 8 (_pair_codes)."""
    shifted = words >> 8
    l0, h0 = _pair_codes(words, False, OFFSET, USE_ASM)  # slots 0, 4: k rows 8r, 8r + 4
    l1, h1 = _pair_codes(words, True, OFFSET, USE_ASM)  # slots 1, 5
    l2, h2 = _pair_codes(shifted, False, OFFSET, USE_ASM)  # slots 2, 6
    l3, h3 = _pair_codes(shifted, True, OFFSET, USE_ASM)  # slots 3, 7
    return l0, h0, l1, h1, l2, h2, l3, h3


@triton.jit
def _row_step(acc, x_ptr, k0, words, scale, zero, R: tl.constexpr, OFFSET: tl.constexpr, USE_ASM: tl.constexpr,
              X_KIND: tl.constexpr):  # fmt: skip
    """``acc += x . W`` over one k-step of ``8 R`` rows (inside one group) for one activation row.

    Per thread: its columns and every k row of the step, so no shuffles; one FFMA per code (_fma2)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _row_x(x_ptr, k0 + tl.arange(0, R) * 8, X_KIND)
    l0, h0, l1, h1, l2, h2, l3, h3 = _decode(words, OFFSET, USE_ASM)
    return _row_total(acc, x0, x1, x2, x3, x4, x5, x6, x7, l0, h0, l1, h1, l2, h2, l3, h3, scale, zero, OFFSET)


@triton.jit
def _row_x(x_ptr, rows, X_KIND: tl.constexpr):
    """One activation row's eight x vectors for a step. Slots 1 and 3 come as 16 * code (_pair_codes): their
    activations take the 1/16 (exact, a power of two)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_pairs(x_ptr, rows, X_KIND)
    return x0, x1 * 0.0625, x2, x3 * 0.0625, x4, x5 * 0.0625, x6, x7 * 0.0625


@triton.jit
def _fma2(part, xa, xb, c_lo, c_hi):
    """``part += xa . c_lo + xb . c_hi`` as two FFMAs per code (two ``+=``, not ``+= a * b + c * d``, which
    compiles to a multiply, an FMA and an add)."""
    part += xa[:, None] * c_lo
    part += xb[:, None] * c_hi
    return part


@triton.jit
def _finish(acc, part, x0, x1, x2, x3, x4, x5, x6, x7, scale, zero, OFFSET: tl.constexpr):
    """One row's step total. The offsets added OFFSET * x for slots 0 and 2 and OFFSET * x / 16 for 1 and 3
    (their x carry the 1/16); sum_k x (code - zero) = part - offsets - zero * sum_k x, and the group's scale
    applies after the k-sum (a step lies in one group)."""
    x_even = tl.sum((x0 + x4) + (x2 + x6), axis=0)
    x_odd = tl.sum((x1 + x5) + (x3 + x7), axis=0)  # already / 16
    return acc + scale * (tl.sum(part, axis=0) - OFFSET * (x_even + x_odd) - zero * (x_even + 16.0 * x_odd))


@triton.jit
def _int4_gemv_row_kernel(
    x_ptr,  # [1, K] activations
    qw_ptr,  # [K/8, N] int32
    s_ptr,  # [K/G, N] scales
    z_ptr,  # [K/G, N] zeros
    out_ptr,  # [1, N] output
    part_ptr,  # [SPLIT_K, 1, N] float32 partials
    lock_ptr,  # int32 counters
    N,
    K,
    SPLIT_K,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,  # 128 per warp: four columns (one 16-byte load) per thread and row
    BLOCK_K: tl.constexpr,  # divides GROUP
    OFFSET: tl.constexpr,
    USE_ASM: tl.constexpr,
    X_KIND: tl.constexpr,
):
    """One activation row: each thread owns four columns and every k row of a step, so the k-sum stays in its
    registers. (Prefetching the next step's words into registers measured no faster: with one-warp programs,
    eight per SM, other warps' loads cover the wait.)"""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    R: tl.constexpr = BLOCK_K // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_lo, k_hi = _k_range(K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        words, scale, zero = _load_step(qw_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, BLOCK_K)
        acc = _row_step(acc, x_ptr, k0, words, scale, zero, R, OFFSET, USE_ASM, X_KIND)
    offs_m = tl.arange(0, 1)
    splitk.store_tile(tl.reshape(acc, (1, BLOCK_N)), out_ptr, part_ptr, lock_ptr, offs_m, offs_n, 1, N, pid_n, pid_k,
                      SPLIT_K)  # fmt: skip


@triton.jit
def _row_total(acc, x0, x1, x2, x3, x4, x5, x6, x7, l0, h0, l1, h1, l2, h2, l3, h3, scale, zero,
               OFFSET: tl.constexpr):  # fmt: skip
    """One activation row's step: its FFMAs over the step's decoded codes (slot pairs (0, 4), (1, 5), (2, 6),
    (3, 7)) into a register tile of its own, then _finish."""
    part = _fma2(tl.zeros(l0.shape, dtype=tl.float32), x0, x4, l0, h0)
    part = _fma2(part, x1, x5, l1, h1)
    part = _fma2(part, x2, x6, l2, h2)
    part = _fma2(part, x3, x7, l3, h3)
    return _finish(acc, part, x0, x1, x2, x3, x4, x5, x6, x7, scale, zero, OFFSET)


@triton.jit(do_not_specialize=["M"])
def _int4_gemv_rows_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, stride_xm, SPLIT_K,
                           GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           OFFSET: tl.constexpr, USE_ASM: tl.constexpr, X_KIND: tl.constexpr):  # fmt: skip
    """Two to four activation rows (``BLOCK_M`` 2 or 4) with the one-row kernel's layout: each step's codes are
    decoded once and serve every row, each row with its own register tile (a ``[rows, k, columns]`` tile
    instead made Triton pick a layout that spills). The default up to ``ROW_MAX_ROWS`` rows;
    benchmarks/quant_kernels_sweep.py's ``rows:`` candidates measure it against the tl.dot kernel."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    R: tl.constexpr = BLOCK_K // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_lo, k_hi = _k_range(K, SPLIT_K, BLOCK_K)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        words, scale, zero = _load_step(qw_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, BLOCK_K)
        rows = k0 + tl.arange(0, R) * 8
        # Rows past M read row M - 1 again (in bounds); store_tile drops their results.
        a0, a1, a2, a3, a4, a5, a6, a7 = _row_x(x_ptr, rows, X_KIND)
        b0, b1, b2, b3, b4, b5, b6, b7 = _row_x(x_ptr, rows + tl.minimum(1, M - 1) * stride_xm, X_KIND)
        if BLOCK_M == 4:
            c0, c1, c2, c3, c4, c5, c6, c7 = _row_x(x_ptr, rows + tl.minimum(2, M - 1) * stride_xm, X_KIND)
            d0, d1, d2, d3, d4, d5, d6, d7 = _row_x(x_ptr, rows + tl.minimum(3, M - 1) * stride_xm, X_KIND)
        l0, h0, l1, h1, l2, h2, l3, h3 = _decode(words, OFFSET, USE_ASM)  # once, for every row
        acc0 = _row_total(acc0, a0, a1, a2, a3, a4, a5, a6, a7, l0, h0, l1, h1, l2, h2, l3, h3, scale, zero, OFFSET)
        acc1 = _row_total(acc1, b0, b1, b2, b3, b4, b5, b6, b7, l0, h0, l1, h1, l2, h2, l3, h3, scale, zero, OFFSET)
        if BLOCK_M == 4:
            acc2 = _row_total(acc2, c0, c1, c2, c3, c4, c5, c6, c7, l0, h0, l1, h1, l2, h2, l3, h3, scale, zero,
                              OFFSET)  # fmt: skip
            acc3 = _row_total(acc3, d0, d1, d2, d3, d4, d5, d6, d7, l0, h0, l1, h1, l2, h2, l3, h3, scale, zero,
                              OFFSET)  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 4:
        acc = tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3))  # [BN, i, j]: row 2i + j
        acc = tl.reshape(tl.permute(acc, (1, 2, 0)), (BLOCK_M, BLOCK_N))
    else:
        acc = tl.reshape(tl.permute(tl.join(acc0, acc1), (1, 0)), (BLOCK_M, BLOCK_N))
    splitk.store_tile(acc, out_ptr, part_ptr, lock_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT_K)


@triton.jit(do_not_specialize=["M"])  # one compile for every row count
def _int4_gemv_kernel(
    x_ptr,  # [M, K] activations
    qw_ptr,  # [K/8, N] int32
    s_ptr,  # [K/G, N] scales
    z_ptr,  # [K/G, N] zeros
    out_ptr,  # [M, N] output
    part_ptr,  # [SPLIT_K, M, N] float32 partials
    lock_ptr,  # int32 counters
    M,
    N,
    K,
    stride_xm,
    SPLIT_K,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 16: tl.dot's smallest tile
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP
    IEEE: tl.constexpr,
):
    """2..16 rows: dequantize a ``[BLOCK_K, BLOCK_N]`` tile in registers and ``tl.dot`` it (Triton pipelines the
    loads, which feed a dot)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    k_lo, k_hi = _k_range(K, SPLIT_K, BLOCK_K)  # K is a multiple of GROUP, GROUP of BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        words, scale, zero = _load_step(qw_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, BLOCK_K)
        w = _dequant(words, scale, zero, BLOCK_K, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    splitk.store_tile(acc, out_ptr, part_ptr, lock_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT_K)


def int4_gemv(
    x: torch.Tensor,  # [M, K], M <= 16
    qweight: torch.Tensor,  # [K/8, N] int32
    scales: torch.Tensor,  # [K/G, N]
    zeros: torch.Tensor,  # [K/G, N]
    group: int,
    num_sms: int,
    config: GemvConfig | None = None,
    kernel: str | None = None,  # "rows" (2-4 rows) forces _int4_gemv_rows_kernel; None: by the row count
) -> torch.Tensor:
    """``x @ W^T`` ``[M, N]`` in ``x``'s dtype for decode-sized ``M``, one launch."""
    m, k = x.shape
    n = qweight.shape[1]
    if m > 16:
        raise ValueError(f"int4_gemv handles at most 16 rows, got {m}")
    rows = kernel == "rows" or 1 < m <= ROW_MAX_ROWS
    if rows and not 1 < m <= 4:
        raise ValueError(f"the INT4 rows kernel takes 2 to 4 rows, got {m}")
    cfg = config or (ROWS_DEFAULT if rows else gemv_config(n, k, m))
    x = x.contiguous()
    block_k = splitk.pow2_divisor(cfg.block_k, group, k)  # >= 8 (K and G are multiples of 8)
    tiles = triton.cdiv(n, cfg.block_n)
    # One-warp row programs need more of them per SM, so more splits (K = 14336 has 112 k-steps of 128).
    one_warp = m == 1 or rows
    split_k = cfg.split_k or splitk.split_for(tiles, k // block_k, num_sms, cfg.per_sm, max_split=32 if one_warp else 16)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    part = splitk.scratch(split_k, m, n, x.device)
    locks = splitk.counters(x.device, tiles)
    x_kind = {torch.bfloat16: 0, torch.float16: 1}.get(x.dtype, 2)
    if rows:
        _int4_gemv_rows_kernel[(tiles, split_k)](
            x, qweight, scales, zeros, out, part, locks, m, n, k, x.stride(0), split_k, GROUP=group,
            BLOCK_M=2 if m == 2 else 4, BLOCK_N=cfg.block_n, BLOCK_K=min(block_k, 64),  # 128 spills at 4 rows
            OFFSET=0.0 if x_kind == 2 else 1024.0, USE_ASM=not dev.interpreting(), X_KIND=x_kind,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out
    if m == 1:
        # 16-bit activations keep fp16's 1024 in every code (one instruction fewer per two codes; the float32
        # sums then carry ~2**10 more rounding error, ~1e-5 relative, under a bf16 or fp16 output's rounding);
        # float32 activations get exact codes.
        _int4_gemv_row_kernel[(tiles, split_k)](
            x, qweight, scales, zeros, out, part, locks, n, k, split_k, GROUP=group, BLOCK_N=cfg.block_n,
            BLOCK_K=block_k, OFFSET=0.0 if x_kind == 2 else 1024.0, USE_ASM=not dev.interpreting(), X_KIND=x_kind,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out
    _int4_gemv_kernel[(tiles, split_k)](
        x, qweight, scales, zeros, out, part, locks, m, n, k, x.stride(0), split_k,
        GROUP=group, BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


@triton.jit
def _int4_dequant_kernel(
    qw_ptr,  # [K/8, N] int32
    s_ptr,  # [K/G, N]
    z_ptr,  # [K/G, N]
    w_ptr,  # [K, N] output, W^T
    N,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,  # packed rows per program (8 * BLOCK_R k rows); 8 * BLOCK_R divides GROUP
    BLOCK_N: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    words = tl.load(qw_ptr + offs_r[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    codes = unpack_codes(words, 8 * BLOCK_R, BLOCK_N)
    group = (pid_r * BLOCK_R * 8) // GROUP
    scale = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    w = (codes - zero[None, :]) * scale[None, :]
    offs_k = pid_r * BLOCK_R * 8 + tl.arange(0, 8 * BLOCK_R)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask_n[None, :])


def int4_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``W^T`` ``[K, N]`` in ``dtype``, exactly :func:`kvik_quant.int4_pack.dequantize_codes`'s values."""
    rows, n = qweight.shape
    k = rows * 8
    w = out if out is not None else torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_r = splitk.pow2_divisor(8, group // 8)  # up to 64 k rows per program, inside one group
    block_n = 128
    _int4_dequant_kernel[(rows // block_r, triton.cdiv(n, block_n))](
        qweight, scales, zeros, w, n, GROUP=group, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4
    )
    return w
