"""SiLU-and-mul that writes the next linear's quantized input rows instead of its 16-bit output.

In a W8A8 MLP (INT8 or FP8 with per-token scales) the down projection's input is made in three passes over
``[M, intermediate]`` values: the SiLU-and-mul kernel writes them, the method's quantizer reads them twice
(the row's max, then the codes) and writes the codes. Here one program per row computes ``silu(gate) * up``
with the eager rounding (:func:`kvik_cuda.silu.silu_and_mul`) and writes the codes and the row's scale as
the method's :class:`~kvik.quantization.base.RowQuantization` states: the same codes as the two kernels,
without the 16-bit values ever written to memory and read back. :class:`kvik_cuda.fused.FusedLlamaMLP`
uses it when its down projection states such a step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvik.quantization.base import RowQuantization

from kvik_cuda.silu import silu_and_mul

_BLOCK = 2048  # columns a program handles per pass


@triton.jit
def _silu_and_mul_chunk(x_ptr, row, stride_x, d, k0, BLOCK: tl.constexpr):
    """``silu(gate) * up`` as the unfused kernel rounds it, for columns ``k0 .. k0 + BLOCK`` (0 past ``d``)."""
    cols = k0 + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = silu_and_mul(gate, up, x_ptr.dtype.element_ty).to(tl.float32)
    return tl.where(mask, y, 0.0), cols, mask


@triton.jit
def _silu_and_mul_quant_kernel(
    x_ptr,  # [M, 2 * d]: gate | up
    q_ptr,  # [M, d] codes
    s_ptr,  # [M] float32 scales
    stride_x,
    d,
    QMAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    ROUND: tl.constexpr,  # integer codes round half away from zero; a float8 conversion rounds itself
    BLOCK: tl.constexpr,
):
    # Two passes over the row, as the row quantizer makes: its max, then the codes. The second recomputes the
    # values from gate and up (a row's read is fresh in L2) instead of keeping a 16-bit copy anywhere.
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK):
        y, cols, mask = _silu_and_mul_chunk(x_ptr, row, stride_x, d, k0, BLOCK)
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, axis=0) / QMAX, MIN_SCALE)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, d, BLOCK):
        y, cols, mask = _silu_and_mul_chunk(x_ptr, row, stride_x, d, k0, BLOCK)
        v = tl.minimum(tl.maximum(y / scale, -QMAX), QMAX)
        if ROUND:
            v = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))
        tl.store(q_ptr + row * d + cols, v.to(q_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_quantized(x: torch.Tensor, spec: RowQuantization) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x`` ``[M, 2d]`` (gate | up, 16-bit) -> (codes ``[M, d]`` of ``spec.dtype``, float32 scales ``[M, 1]``), the
    rows of ``silu(gate) * up`` quantized as ``spec`` states; None where this kernel does not apply (another
    layout or dtype)."""
    if x.dim() != 2 or x.stride(-1) != 1 or x.dtype not in (torch.bfloat16, torch.float16) or x.shape[0] == 0:
        return None
    m, d = x.shape[0], x.shape[1] // 2
    codes = torch.empty(m, d, dtype=spec.dtype, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = min(_BLOCK, triton.next_power_of_2(d))
    _silu_and_mul_quant_kernel[(m,)](
        x, codes, scales, x.stride(0), d,
        QMAX=spec.qmax, MIN_SCALE=spec.min_scale, ROUND=not spec.dtype.is_floating_point, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return codes, scales
