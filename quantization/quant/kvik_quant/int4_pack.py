"""INT4 packings as the quantizers write them, and kvik's one layout the kernels read.

kvik's layout (what every INT4 checkpoint is repacked into at load):

* ``qweight`` int32 ``[K/8, N]``: nibble ``j`` (bits ``4j..4j+3``) of ``qweight[r, n]`` is the
  unsigned code ``q[8r + j, n]`` in 0..15 (GPTQ's own weight packing, so its weights copy as they are);
* ``scales`` and ``zeros`` ``[K/G, N]`` in the compute dtype: ``W[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n]``
  with ``g = k // G``;
* optionally ``perm`` int64 ``[K]`` (act-order): row ``i`` of ``qweight`` is input feature ``perm[i]``.

The checkpoint packings (all int32 words of eight 4-bit codes):

* GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` ``gptq``): ``qweight`` ``[K/8, N]`` as above; ``qzeros``
  ``[K/G, N/8]`` packed along N, storing ``zero - 1`` (the v1 offset; ``gptq_v2`` stores ``zero``);
  ``scales`` ``[K/G, N]``; ``g_idx`` ``[K]`` (group of each input feature; permuted with act-order).
* AWQ (AutoAWQ GEMM): ``qweight`` ``[K, N/8]`` packed along N in the interleaved order
  ``[0, 2, 4, 6, 1, 3, 5, 7]`` (word nibble ``j`` holds column ``8c + AWQ_ORDER[j]``);
  ``qzeros`` ``[K/G, N/8]`` the same way; ``scales`` ``[K/G, N]``.
* compressed-tensors ``pack-quantized``: ``weight_packed`` ``[N, K/8]`` packed along K with the signed
  code offset by +8; ``weight_scale`` ``[N, K/G]``; asymmetric ``weight_zero_point`` ``[N/8, K/G]``
  packed along N (dim 0), also +8; optional ``weight_g_idx`` ``[K]``.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word nibble j holds column AWQ_ORDER[j] of its 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j at bits 4j


def unpack_last(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., C]`` -> int32 ``[..., 8C]`` codes 0..15, nibble ``j`` of word ``c`` -> element ``8c + j``."""
    codes = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def pack_last(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_last`: int ``[..., 8C]`` codes 0..15 -> int32 ``[..., C]``."""
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    words = (c << _SHIFTS.to(codes.device, torch.int64)).sum(dim=-1)  # disjoint bit fields: sum == OR
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # the same 32 bits, signed


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """kvik/GPTQ ``[K/8, N]`` -> codes ``[K, N]``."""
    return unpack_last(qweight.t().contiguous()).t()


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """codes ``[K, N]`` -> kvik/GPTQ ``[K/8, N]``."""
    return pack_last(codes.t().contiguous()).t().contiguous()


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ ``[R, N/8]`` (interleaved) -> codes ``[R, N]`` in column order."""
    codes = unpack_last(packed).reshape(packed.shape[0], -1, 8)
    order = torch.tensor(AWQ_ORDER, device=packed.device)
    out = torch.empty_like(codes)
    out[..., order] = codes  # nibble j is column AWQ_ORDER[j]
    return out.reshape(packed.shape[0], -1)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """codes ``[R, N]`` -> AutoAWQ ``[R, N/8]`` (for tests and writing fixtures)."""
    grouped = codes.reshape(codes.shape[0], -1, 8)[..., list(AWQ_ORDER)]
    return pack_last(grouped.reshape(codes.shape[0], -1))


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """codes ``[K, N]`` with ``[K/G, N]`` scales/zeros -> ``W^T`` ``[K, N]`` in ``dtype`` (rounded once)."""
    k, n = codes.shape
    grouped = codes.reshape(k // group, group, n).float()  # broadcast each group's scale over its rows
    return ((grouped - zeros.float()[:, None, :]) * scales.float()[:, None, :]).reshape(k, n).to(dtype)
