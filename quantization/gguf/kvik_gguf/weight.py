"""What the GGUF format hands a quantized linear layer, and llama.cpp's Q/K row order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvik.entrypoints.onnx_exact_blocks import AffineBlocks

from kvik_gguf.dequant import GGML_TYPE_SIZES, _f16, _nibbles, dequantize, type_name


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
        bits, codes_at = layout
        rows, cols = self.shape
        blocks = self.data.reshape(-1, GGML_TYPE_SIZES[self.ggml_type][2])
        scales = _f16(blocks, 0)  # [blocks, 1]
        if bits == 8:  # signed codes shifted to unsigned: d * q = d * (q + 128) - 128 d
            codes = (blocks[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
            mins = -128 * scales
        else:  # Q4_1 stores its minimum after d; Q4_0 is d * (q - 8)
            codes = _nibbles(blocks[:, codes_at:], 16)
            mins = _f16(blocks, 2) if codes_at == 4 else -8 * scales
        per_row = (rows, cols // 32)
        return AffineBlocks(bits, codes.reshape(rows, cols).numpy(), scales.reshape(per_row).numpy(),
                            mins.reshape(per_row).numpy())  # fmt: skip


# ggml type -> (bits per code, byte offset of the codes in a block) for the block-32 affine encodings.
_AFFINE = {2: (4, 2), 3: (4, 4), 8: (8, 2)}  # Q4_0, Q4_1, Q8_0


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
