"""FP8 (e4m3) KV-cache values in torch: the quantize / dequantize every torch backend shares.

A cache entry holds ``x / scale`` rounded to float8_e4m3fn (saturated at +-448, the
largest finite e4m3 value: the format has no infinity, and an overflowing cast would
be NaN on some devices); reading multiplies by ``scale`` again. ``scale`` is one float
per layer for K and one for V (vLLM's ``k_scale`` / ``v_scale``).

CPU torch lacks ``index_copy_`` for float8 tensors, so writes go through a uint8 view
(the same bytes): :func:`write_slots` works for any cache dtype.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the paged cache for a resolved ``kv_cache_dtype`` ("auto" or "fp8_e4m3")."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "fp8_e4m3":
        return FP8_DTYPE
    raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected 'auto' or 'fp8_e4m3'")


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_DTYPE


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (any float dtype) -> float8_e4m3fn of ``x / scale``, saturated at +-448 (computed in float32)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn ``x`` -> ``x * scale`` in ``dtype`` (the e4m3 values are exact in bf16/fp16/fp32)."""
    out = x.to(dtype)
    return out if scale == 1.0 else out.mul_(scale)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, scale: float) -> None:
    """cache [num_slots, ...] at rows ``slots`` [n] int64 <- values [n, ...] (quantized when the cache is FP8)."""
    if not is_fp8(cache):
        cache.index_copy_(0, slots, values.to(cache.dtype))
        return
    cache.view(torch.uint8).index_copy_(0, slots, quantize(values, scale).view(torch.uint8))


def index_select(cache: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``cache.index_select(dim, index)``, through a uint8 view for FP8 (not every device's kernel takes float8)."""
    if not is_fp8(cache):
        return cache.index_select(dim, index)
    return cache.view(torch.uint8).index_select(dim, index).view(FP8_DTYPE)
