"""What the GGUF format hands a quantized linear layer, and llama.cpp's Q/K row order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from kvik.entrypoints.onnx_exact_blocks import AffineBlocks

from kvik_gguf.dequant import dequantize, type_name


@dataclass(slots=True)
class GGUFWeight:
    """A linear weight still in llama.cpp's block encoding.

    ``data`` is ``[rows, bytes_per_row]`` uint8: each row holds whole blocks,
    so rows can be permuted or sliced without decoding. ``shape`` is the
    logical ``(rows, cols)`` (Hugging Face ``[out_features, in_features]``).
    """

    data: torch.Tensor
    ggml_type: int
    shape: tuple[int, int]

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.ggml_type, self.shape, dtype)

    def dequantize_into(self, out: torch.Tensor) -> None:
        """Decode into ``out`` (a dense parameter of this shape, any float dtype), a slice at a time:
        no float32 copy of the whole tensor (SmolLM2's token embedding: 113 MB) is ever held."""
        if tuple(out.shape) != tuple(self.shape):
            raise ValueError(
                f"{self.type_name} weight of shape {self.shape} cannot fill a parameter of shape {tuple(out.shape)}"
            )
        dequantize(self.data, self.ggml_type, self.shape, out.dtype, out=out)


    def affine_blocks(self) -> AffineBlocks | None:
        """The weight as ``scales * codes + mins`` over its blocks of 32, bit for bit, for the block types that
        are exactly that (Q4_0, Q4_1, Q8_0; kvik.entrypoints.onnx_exact_blocks writes them into an ONNX export).
        None for the others (k-quants' 6-bit sub-block scales, 5- and 6-bit codes)."""
        layout = _AFFINE.get(self.ggml_type)
        if layout is None:
            return None
        block_bytes, has_min, bits = layout
        rows, cols = self.shape
        raw = self.data.numpy().reshape(rows, cols // 32, block_bytes)
        scales = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if bits == 8:  # d, then 32 signed codes: w = d * q = d * (q + 128) - 128 d
            codes = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            mins = np.float32(-128) * scales
        else:  # d, [m,] then 16 bytes: byte j holds element j (low nibble) and element j + 16 (high nibble)
            qs = raw[..., 4:] if has_min else raw[..., 2:]
            codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
            mins = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if has_min else np.float32(-8) * scales
        return AffineBlocks(bits, codes.reshape(rows, cols), scales, mins)


# ggml type -> (bytes per block of 32, stores a minimum, bits per code) for the block-32 affine encodings.
_AFFINE = {2: (18, False, 4), 3: (20, True, 4), 8: (34, False, 8)}  # Q4_0, Q4_1, Q8_0


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter gives llama/mistral q_proj and k_proj.

    Hugging Face stores each head's rotary pairs as two halves (rows ``[0, half)``
    then ``[half, 2*half)``); the converter interleaves them so rows alternate
    between the halves. In GGUF a head's rows are therefore ``[half, 2]`` and
    we swap them back to ``[2, half]``. Works on any ``[rows, ...]`` tensor,
    dense values or raw quantized rows alike. ``num_heads`` is the head count
    of this projection (kv heads for k_proj).
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows over {num_heads} heads: rows must be a multiple of 2*heads")
    half = rows // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()
