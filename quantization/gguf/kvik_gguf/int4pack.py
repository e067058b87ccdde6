"""GGUF blocks repacked for torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``).

The kernel multiplies ``x [M, K]`` by a weight held as 4-bit codes ``c`` in
groups of ``G`` columns, each group with its own scale ``s`` and zero ``z``:
``w = s * (c - 8) + z``. Every llama.cpp type below decodes, per group of 32
values, as ``x = s * u + o`` with an unsigned integer code ``u`` (``s`` and
``o`` are float16 scales or products of a float16 and a small integer, so
float32 holds them exactly). Hence:

- 4-bit codes (Q4_0, Q4_1, Q4_K): one plane, ``c = u``, ``z = o + 8 s``.
- 5- and 8-bit codes (Q5_0, Q5_1, Q5_K, Q8_0): two planes, ``u = 16 h + l``:
  ``h`` with scale ``16 s`` and zero 0, ``l`` with scale ``s`` and a zero that
  takes the rest of the offset; the weight becomes ``[N, 2K]`` and the input
  ``[x, x]``, so the sum of both planes is one kernel call.

The repack is lossless in exact arithmetic and, with float32 scales, up to
float32 rounding (the zero ``o + 8 s`` is one rounded addition, and the kernel
sums in its own order): outputs agree with the dequantized reference to
~1e-6 relative. With bfloat16/float16 activations the kernel needs scales in
that dtype, which rounds the float16 block scales (bf16 keeps 8 of their 11
mantissa bits): that path is lossy and documented as such. Q6_K (groups of 16
values), Q2_K and Q3_K (groups of 16) have no exact 32-wide grouping and stay
on the dequantizing path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvik_gguf.dequant import K_SCALE_SIZE, QK_K, _bits, _f16, _high_bits_u32, _k_scales_mins, _nibbles
from kvik_gguf.ggml_types import GGML_TYPE_SIZES

GROUP = 32  # values per scale in every repacked type
# Activation dtypes the kernel is fast for. In torch 2.13 its float32 path is a scalar
# reference loop (~3 ms for a 1536x576 weight at batch 1 vs ~0.3 ms in bfloat16 on AVX-512).
FAST_DTYPES = frozenset({torch.bfloat16})


def _u_q4_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b, 0)
    return _nibbles(b[:, 2:], 16), d, -8 * d


def _u_q4_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _nibbles(b[:, 4:], 16), _f16(b, 0), _f16(b, 2)


def _u_q5_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b, 0)
    return _nibbles(b[:, 6:], 16) | (_high_bits_u32(b[:, 2:6]) << 4), d, -16 * d


def _u_q5_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _nibbles(b[:, 8:], 16) | (_high_bits_u32(b[:, 4:8]) << 4), _f16(b, 0), _f16(b, 2)


def _u_q8_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b, 0)
    u = (b[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return u, d, -128 * d


def _k_scale_offset(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the eight sub-block scales ``d*sc`` and offsets ``-dmin*mn``, each ``[n, 8]``."""
    sc, mn = _k_scales_mins(b[:, 4 : 4 + K_SCALE_SIZE])
    return _f16(b, 0) * sc.float(), -(_f16(b, 2) * mn.float())


def _u_q4_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, o = _k_scale_offset(b)
    return _nibbles(b[:, 4 + K_SCALE_SIZE :], 32), s, o


def _u_q5_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    s, o = _k_scale_offset(b)
    qh_start = 4 + K_SCALE_SIZE
    qs_start = qh_start + QK_K // 8
    ql = _nibbles(b[:, qs_start:], 32).reshape(n, 8, 32)
    qh = _bits(b[:, qh_start:qs_start], 32, 1).reshape(n, 8, 32)
    return (ql | (qh << 4)).reshape(n, QK_K), s, o


# ggml type id -> (bits of the code u, block -> (u [n, block] uint8, s [n, block/32], o [n, block/32]))
_CODES: dict[int, tuple[int, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {
    2: (4, _u_q4_0),
    3: (4, _u_q4_1),
    6: (5, _u_q5_0),
    7: (5, _u_q5_1),
    8: (8, _u_q8_0),
    12: (4, _u_q4_k),
    13: (5, _u_q5_k),
}
PACKABLE_TYPES = frozenset(_CODES)


def kernel_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def packable(ggml_type: int, cols: int) -> bool:
    return ggml_type in _CODES and cols % GROUP == 0 and kernel_available()


@dataclass(slots=True)
class Int4Packed:
    """One weight ready for the kernel: ``planes`` (1 or 2) stacked along K. With ``lookups`` (a tied LM
    head, whose rows are also the token embedding) it keeps each group's exact float32 scale and offset
    as well, so :meth:`rows` decodes any row bit for bit as the dense dequantization does."""

    weight: torch.Tensor  # kernel layout of [rows, planes*cols] 4-bit codes
    scales_zeros: torch.Tensor  # [planes*cols/32, rows, 2] in the activation dtype
    planes: int
    bits: int = 4  # of the code u the planes hold (4, 5 or 8)
    row_scales: torch.Tensor | None = None  # [rows, cols/32]: x = s * u + o, as the dense decode
    row_offsets: torch.Tensor | None = None  # [rows, cols/32]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # 2-D already (the engine's rows): no reshapes,
        if self.planes == 2:  # which a single stream would otherwise run 240 of a token
            flat = torch.cat([flat, flat], dim=-1)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.scales_zeros)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])

    def nbytes(self) -> int:
        extra = [t for t in (self.row_scales, self.row_offsets) if t is not None]
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_zeros, *extra))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the weight, decoded as the dense dequantization decodes them (``s * u + o`` in float32,
        rounded once to ``dtype``): the token embedding's lookups from the tied head's packed copy."""
        if self.row_scales is None or self.row_offsets is None:
            raise RuntimeError("this packed weight was made without lookups=True")
        groups = self.row_scales.shape[1]
        cols = groups * GROUP
        flat = ids.reshape(-1).long()
        nibbles = _row_nibbles(self.weight, flat, self.planes * cols)  # [n, planes*cols] uint8
        if self.planes == 1:
            u = nibbles.float()
        else:  # the high plane's codes are centred for 5-bit codes (repack's "lift")
            u = (nibbles[:, :cols].float() - (8 if self.bits == 5 else 0)) * 16 + nibbles[:, cols:]  # exact in float32
        u = u.view(-1, groups, GROUP)
        # Two roundings in float32, as the dense decode's multiply and add.
        out = (u * self.row_scales[flat][:, :, None] + self.row_offsets[flat][:, :, None]).to(dtype)
        return out.reshape(*ids.shape, cols)


@dataclass(slots=True)
class PackedHead:
    """A tied LM head through the kernel that also decodes the token embedding's rows
    (``kvik.quantization.base.PackedRows``): the embedding then holds no dense copy."""

    packed: Int4Packed
    dtype: torch.dtype  # the model's: what the dense embedding would hold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.matmul(x)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed.rows(ids, self.dtype)


# The CPU kernel's weight layout (torch 2.13, probed by layout_understood): rows in tiles of 64; in a tile,
# byte ``k * 32 + (row % 32)`` holds column k of rows ``row % 32`` (low nibble) and ``row % 32 + 32`` (high).
_TILE_ROWS = 64


_column_bytes: dict[int, torch.Tensor] = {}  # width -> each column's byte offset within a tile (a lookup per token)


def _row_nibbles(weight: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """The 4-bit codes ``[len(rows), width]`` of ``rows`` from the kernel's packed ``weight``."""
    if rows.numel() == 1:  # a decode step's one token: its bytes are a strided view, no gather
        row = int(rows.item())
        start = (row // _TILE_ROWS) * (_TILE_ROWS * width // 2) + row % 32
        return (weight.reshape(-1)[start : start + 32 * width : 32][None, :] >> (row % _TILE_ROWS) // 32 * 4) & 0x0F
    columns = _column_bytes.get(width)
    if columns is None:
        columns = _column_bytes.setdefault(width, torch.arange(width, dtype=torch.long) * 32)
    base = (rows // _TILE_ROWS) * (_TILE_ROWS * width // 2) + rows % 32
    byte = weight.reshape(-1)[base[:, None] + columns]
    shift = ((rows % _TILE_ROWS) // 32 * 4).to(torch.uint8)
    return (byte >> shift[:, None]) & 0x0F


_layout: list[bool] = []


def layout_understood() -> bool:
    """Whether this torch's packed layout is the one :func:`_row_nibbles` reads (checked once on random codes
    over two tiles): the layout is the kernel's private business, so lookups are only served where it holds."""
    if not _layout:
        codes = torch.randint(0, 16, (2 * _TILE_ROWS, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            ok = packed.numel() * 2 == codes.numel() and torch.equal(
                _row_nibbles(packed, torch.arange(codes.shape[0]), codes.shape[1]).to(torch.int32), codes
            )
        except (RuntimeError, IndexError):
            ok = False
        _layout.append(ok)
    return _layout[0]


# Rows repacked at a time: the kernel's layout packs rows independently (a multiple of its 64-row tiles
# concatenates exactly). A chunk's int32 codes and planes take ~10 bytes a value, ~6 MB here for a
# 576-wide weight: a whole [49152 x 576] head at once would be ~0.5 GB.
CHUNK_ROWS = 512


def repack(
    raw: torch.Tensor, ggml_type: int, rows: int, cols: int, dtype: torch.dtype, lookups: bool = False
) -> Int4Packed:
    """``raw`` ``[rows, bytes_per_row]`` uint8 of one packable type -> the kernel's layout, ``CHUNK_ROWS``
    rows at a time, each written into the result as it is made (so neither the transient int32 codes
    nor a list of packed chunks to concatenate, a second copy of the result, are ever held). ``lookups``:
    also keep what :meth:`Int4Packed.rows` needs (the groups' float32 scales and offsets)."""
    if not packable(ggml_type, cols):
        raise ValueError(f"ggml type {ggml_type} with {cols} columns cannot be repacked for the int4 kernel")
    first = _repack_rows(raw[:CHUNK_ROWS], ggml_type, min(CHUNK_ROWS, rows), cols, dtype, lookups)
    if rows <= CHUNK_ROWS:
        return first
    weight = first.weight.new_empty((rows, *first.weight.shape[1:]))
    scales_zeros = first.scales_zeros.new_empty((first.scales_zeros.shape[0], rows, 2))  # [groups, rows, 2]
    row_scales = row_offsets = None
    if first.row_scales is not None and first.row_offsets is not None:
        row_scales = first.row_scales.new_empty((rows, first.row_scales.shape[1]))
        row_offsets = first.row_offsets.new_empty((rows, first.row_offsets.shape[1]))
    for start in range(0, rows, CHUNK_ROWS):
        end = min(start + CHUNK_ROWS, rows)
        part = first if start == 0 else _repack_rows(raw[start:end], ggml_type, end - start, cols, dtype, lookups)
        weight[start:end] = part.weight
        scales_zeros[:, start:end] = part.scales_zeros
        if row_scales is not None and row_offsets is not None:
            row_scales[start:end] = part.row_scales
            row_offsets[start:end] = part.row_offsets
    return Int4Packed(weight, scales_zeros, first.planes, first.bits, row_scales, row_offsets)


def _repack_rows(
    raw: torch.Tensor, ggml_type: int, rows: int, cols: int, dtype: torch.dtype, lookups: bool = False
) -> Int4Packed:
    bits, codes = _CODES[ggml_type]
    _, _, size = GGML_TYPE_SIZES[ggml_type]
    u, s, o = codes(raw.reshape(-1, size))
    groups = cols // GROUP
    u = u.reshape(rows, cols).to(torch.int32)
    s, o = s.reshape(rows, groups), o.reshape(rows, groups)
    if bits <= 4:
        plane_codes, plane_scales, plane_zeros = [u], [s], [o + 8 * s]
    else:
        # High codes are centred so that plane carries 16*s*h (5-bit: h in {0, 1} -> codes 8, 9)
        # or 16*s*(h-8) (8-bit); the low plane's zero takes the rest. Keeping both planes near
        # the value's own size avoids cancelling large terms in float32.
        lift = 8 if bits == 5 else 0
        plane_codes = [(u >> 4) + lift, u & 0x0F]
        plane_scales = [16 * s, s]
        plane_zeros = [torch.zeros_like(s), o + 8 * s + 16 * (8 - lift) * s]
    if len(plane_codes) == 1:  # 4-bit codes: one plane, nothing to join (each cat was a copy: ~15% of a repack)
        codes_all, scale, zero = u, s, plane_zeros[0]
    else:
        codes_all = torch.cat(plane_codes, dim=1).contiguous()
        scale = torch.cat(plane_scales, dim=1)  # [rows, planes*groups]
        zero = torch.cat(plane_zeros, dim=1)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_all, 1)
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()
    if not lookups:
        return Int4Packed(weight, scales_zeros, len(plane_codes), bits)
    return Int4Packed(weight, scales_zeros, len(plane_codes), bits, s.float().contiguous(), o.float().contiguous())
