"""FP8 (e4m3) quantization arithmetic: weight and activation scales, the reference matmul, the CUDA GEMM.

Conventions: a quantized tensor is ``q`` (``torch.float8_e4m3fn``) with float32
scales such that ``value ≈ q.float() * scale``. Weights are ``[N, K]`` (out, in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# Smallest scale kept: an all-zero row or token would otherwise divide by zero (vLLM uses the same floor).
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to the e4m3 range and rounded to FP8 (``scale`` broadcasts against ``x``)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` float -> (``[N, K]`` FP8, ``[N]`` float32 scales): one scale per output channel."""
    scale = (weight.abs().amax(dim=1).float() / FP8_MAX).clamp_min(MIN_SCALE)
    return to_fp8(weight, scale[:, None]), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: ``[M, K]`` -> (``[M, K]`` FP8, ``[M, 1]`` float32 scales)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(MIN_SCALE)
    return to_fp8(x, scale), scale


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static activation quantization with a calibrated per-tensor scale: scales come back ``[M, 1]``."""
    scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return to_fp8(x, scale), scale


def quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 1 x ``group`` quantization (block-FP8 checkpoints): ``[M, K]`` -> (FP8, ``[M, K/group]`` scales)."""
    m, k = x.shape
    groups = x.reshape(m, k // group, group)
    scale = (groups.abs().amax(dim=-1).float() / FP8_MAX).clamp_min(MIN_SCALE)  # [M, K/group]
    return to_fp8(groups, scale[..., None]).reshape(m, k), scale


def expand_block_scales(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """``[ceil(N/bn), ceil(K/bk)]`` block scales -> ``[N, K]``, one per weight element."""
    bn, bk = block
    n, k = shape
    return scale.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def reference_mm(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Dequantize both operands to ``dtype`` and multiply: what :func:`scaled_mm` computes, on any device.

    ``x_scale`` broadcasts against ``[M, K]`` (``[M, 1]`` per token or ``[M, K]``
    per element); ``w_scale`` against ``[N, K]`` (``[N, 1]`` or ``[N, K]``).
    """
    x = (xq.float() * x_scale).to(dtype)
    w = (wq.float() * w_scale).to(dtype)
    return F.linear(x, w)


def scaled_mm(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale_row: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``[M, K] x [N, K]^T`` on FP8 tensor cores (``torch._scaled_mm``, rowwise scales; CUDA, sm >= 8.9).

    ``x_scale`` is ``[M, 1]`` and ``w_scale_row`` ``[1, N]``, both float32. Row-wise
    scaling needs a bfloat16 output; other dtypes are cast from it.
    """
    out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale.contiguous(), scale_b=w_scale_row, out_dtype=torch.bfloat16)
    return out if dtype == torch.bfloat16 else out.to(dtype)


def fp8_gemm_shape_ok(n: int, k: int) -> bool:
    """``torch._scaled_mm`` needs both weight dimensions divisible by 16."""
    return n % 16 == 0 and k % 16 == 0
