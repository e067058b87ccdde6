"""llama.cpp block formats decoded with vectorised torch ops.

Every function takes ``blocks``: ``[n_blocks, type_size]`` uint8 (the raw
bytes of a tensor, one row per block) and returns ``[n_blocks, block_size]``
float32. The arithmetic is done in float32 in the same order as gguf-py's
numpy reference (``gguf.quants``), so results agree bit for bit.

Layouts (bytes, little-endian; ``d``/``dmin``/``m`` are float16):

- Q8_0 (32 values, 34 bytes): d, int8 q[32];                 x = d*q
- Q4_0 (32, 18): d, nibbles[16];                              x = d*(q-8)
- Q4_1 (32, 20): d, m, nibbles[16];                           x = d*q + m
- Q5_0 (32, 22): d, high bits u32, nibbles[16];               x = d*(q-16)
- Q5_1 (32, 24): d, m, high bits u32, nibbles[16];            x = d*q + m
- Q2_K .. Q6_K (256 values): 16 or 8 sub-blocks with their own 4/6/8-bit scales.

Nibble order: in each group of bytes the low nibbles come first, then the
high nibbles (value ``j`` is ``qs[j] & 15``, value ``j+G`` is ``qs[j] >> 4``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvik_gguf.ggml_types import (  # noqa: F401 - re-exported: the torch-free names live there
    FLOAT_TYPES,
    GGML_TYPE_SIZES,
    check_supported,
    row_bytes,
    supported_type_names,
    type_name,
)

QK_K = 256  # values per "K-quant" super-block
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of every block, as float32 ``[n, 1]``."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """``[n, k*group]`` bytes -> ``[n, 2*k*group]`` values, low nibbles of each group first."""
    n = qs.shape[0]
    grouped = qs.reshape(n, -1, 1, group)
    return torch.cat([grouped & 0x0F, grouped >> 4], dim=2).reshape(n, -1)


def _bits(packed: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Unpack ``bits``-wide fields: ``[n, k*group]`` -> ``[n, k, 8//bits, group]`` (lowest field first)."""
    n = packed.shape[0]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).reshape(1, 1, -1, 1)
    mask = (1 << bits) - 1
    return (packed.reshape(n, -1, 1, group) >> shifts) & mask


def _high_bits_u32(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes of a little-endian uint32 -> ``[n, 32]`` bits (bit ``j`` belongs to value ``j``)."""
    return _bits(qh, 4, 1).permute(0, 1, 3, 2).reshape(qh.shape[0], 32)


def dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:], 16).to(torch.int8) - 8
    return _f16(blocks, 0) * q  # int8 promoted to float32 inside the multiply, no float copy of q


def dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    dm = blocks[:, :4].contiguous().view(torch.float16).float()  # [n, 2]: d, m
    # m + d*q in one pass; q (uint8) is promoted on the fly. Same float32 rounding as d*q + m.
    return torch.addcmul(dm[:, 1:2], dm[:, 0:1], _nibbles(blocks[:, 4:], 16))


def dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 6:], 16) | (_high_bits_u32(blocks[:, 2:6]) << 4)
    return _f16(blocks, 0) * (q.to(torch.int8) - 16).float()


def dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 8:], 16) | (_high_bits_u32(blocks[:, 4:8]) << 4)
    return _f16(blocks, 0) * q.float() + _f16(blocks, 2)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each ``[n, 8]``.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7;
    bytes 4-7 the same for mins; bytes 8-11 the low 4 bits of scales/mins 4-7.
    """
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    sc, mn = _k_scales_mins(blocks[:, 4 : 4 + K_SCALE_SIZE])
    d = (_f16(blocks, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(blocks[:, 4 + K_SCALE_SIZE :], 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    sc, mn = _k_scales_mins(blocks[:, 4 : 4 + K_SCALE_SIZE])
    d = (_f16(blocks, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).reshape(n, 8, 1)
    qh_start = 4 + K_SCALE_SIZE
    qs_start = qh_start + QK_K // 8
    ql = _nibbles(blocks[:, qs_start:], 32).reshape(n, 8, 32)
    # qh: 32 bytes; bit i of byte j is the 5th bit of value j of sub-block i.
    qh = _bits(blocks[:, qh_start:qs_start], 32, 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql_end, qh_end, sc_end = QK_K // 2, QK_K // 2 + QK_K // 4, QK_K // 2 + QK_K // 4 + QK_K // 16
    scales = blocks[:, qh_end:sc_end].contiguous().view(torch.int8).float()
    d = (_f16(blocks, sc_end) * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(blocks[:, :ql_end], 64).reshape(n, -1, 32)
    qh = _bits(blocks[:, ql_end:qh_end], 32, 2).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


def dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, : QK_K // 16]
    qs = blocks[:, QK_K // 16 : QK_K // 16 + QK_K // 4]
    d_at = QK_K // 16 + QK_K // 4
    dl = (_f16(blocks, d_at) * (scales & 0x0F).float()).reshape(n, QK_K // 16, 1)
    ml = (_f16(blocks, d_at + 2) * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    q = _bits(qs, 32, 2).reshape(n, QK_K // 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask = blocks[:, : QK_K // 8]
    qs = blocks[:, QK_K // 8 : QK_K // 8 + QK_K // 4]
    sc_at = QK_K // 8 + QK_K // 4
    packed = blocks[:, sc_at : sc_at + 12]
    # Sixteen 6-bit scales: low 4 bits from bytes 0-7 (low nibbles first), high 2 bits from bytes 8-11.
    low = torch.cat([packed[:, :8] & 0x0F, packed[:, :8] >> 4], dim=-1)
    high = _bits(packed[:, 8:], 4, 2).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(blocks, sc_at + 12) * scales).reshape(n, 16, 1)
    ql = _bits(qs, 32, 2).reshape(n, 16, QK_K // 16).to(torch.int8)
    # A set hmask bit means "no offset"; a clear one subtracts 4.
    qh = (_bits(hmask, 32, 1).reshape(n, 16, QK_K // 16) ^ 1).to(torch.int8)
    return (dl * (ql - (qh << 2)).float()).reshape(n, QK_K)


def dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


_DECODERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    0: dequant_f32,
    1: dequant_f16,
    2: dequant_q4_0,
    3: dequant_q4_1,
    6: dequant_q5_0,
    7: dequant_q5_1,
    8: dequant_q8_0,
    10: dequant_q2_k,
    11: dequant_q3_k,
    12: dequant_q4_k,
    13: dequant_q5_k,
    14: dequant_q6_k,
    30: dequant_bf16,
}
# ggml type id -> (name, values per block, bytes per block, decoder)
GGML_TYPES: dict[int, tuple[str, int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    t: (*sizes, _DECODERS[t]) for t, sizes in GGML_TYPE_SIZES.items()
}


# Values decoded at a time (whole blocks). A decoder builds several float32 temporaries the size of
# its result (Q8_0: the int8 codes widened, the scales, the product), so decoding a large tensor in
# one go held ~2.5x its float32 size at once: ~250 MB for SmolLM2's [49152 x 576] token embedding.
CHUNK_VALUES = 1 << 20


def dequantize(
    raw: torch.Tensor,
    ggml_type: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode ``raw`` (uint8, any shape, ``prod(shape)`` values' worth of bytes) to ``shape`` in ``dtype``.

    With ``out`` (contiguous, ``shape``) the values are written there, in its dtype, and it is returned.
    Large tensors are decoded ``CHUNK_VALUES`` values at a time into the result (the same values:
    every block decodes on its own)."""
    check_supported(ggml_type, "<raw>")
    _, per_block, size, decode = GGML_TYPES[ggml_type]
    if raw.dtype != torch.uint8:
        raise TypeError(f"expected raw uint8 bytes, got {raw.dtype}")
    blocks = raw.reshape(-1, size)
    n = blocks.shape[0]
    if out is not None and (tuple(out.shape) != tuple(shape) or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(shape)}, got {tuple(out.shape)}")
    chunk = max(1, CHUNK_VALUES // per_block)
    if out is None and n <= chunk:
        return decode(blocks).reshape(shape).to(dtype)
    result = torch.empty((n, per_block), dtype=dtype, device=raw.device) if out is None else out.view(n, per_block)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        result[start:end] = decode(blocks[start:end]).reshape(end - start, per_block)  # converts the dtype
    return result.view(shape) if out is None else out
