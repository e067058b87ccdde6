"""FP8 (e4m3) KV-cache values in torch: the quantize / dequantize every torch backend shares.

A cache entry holds ``x / scale`` rounded to float8_e4m3fn (saturated at +-448, the
largest finite e4m3 value: the format has no infinity, and an overflowing cast would
be NaN on some devices); reading multiplies by ``scale`` again. ``scale`` is one float
per layer for K and one for V (vLLM's ``k_scale`` / ``v_scale``).

CPU torch lacks ``index_copy_`` for float8 tensors, so writes go through a uint8 view
(the same bytes): :func:`write_slots` works for any cache dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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


# calculate_kv_scales: the measured largest |K| / |V| maps to FP8_MAX / KV_SCALE_HEADROOM, so values up
# to twice the calibration's largest stay unsaturated (e4m3's precision is relative: nothing is lost
# in the middle of the range by leaving headroom).
KV_SCALE_HEADROOM = 2.0


@contextmanager
def observed_kv_amax(layers: list[Any], indices: list[int]) -> Iterator[torch.Tensor]:
    """While open, ``layers[i]`` for i in ``indices`` record the largest ``|key|`` and ``|value|`` their
    ``forward`` is handed into row i of the yielded ``[len(layers), 2]`` float32 tensor (on the
    layers' device, read it after the context: one synchronisation, not one per layer)."""
    amax: torch.Tensor | None = None
    patched: list[Any] = []

    def observing(i: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        def observe(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any) -> Any:
            nonlocal amax
            if amax is None:
                amax = torch.zeros(len(layers), 2, dtype=torch.float32, device=key.device)
            amax[i, 0] = torch.maximum(amax[i, 0], key.detach().abs().amax().float())
            amax[i, 1] = torch.maximum(amax[i, 1], value.detach().abs().amax().float())
            return forward(query, key, value, *args)

        return observe

    result = torch.zeros(len(layers), 2, dtype=torch.float32)
    try:
        for i in indices:
            layers[i].forward = observing(i, layers[i].forward)  # an instance attribute shadows the method
            patched.append(layers[i])
        yield result
    finally:
        for layer in patched:
            del layer.forward
        if amax is not None:
            result.copy_(amax.cpu())


def scale_from_amax(amax: float) -> float:
    """The per-tensor scale for values whose largest magnitude is ``amax`` (1.0 when none were seen)."""
    return amax * KV_SCALE_HEADROOM / FP8_MAX if amax > 0 else 1.0
