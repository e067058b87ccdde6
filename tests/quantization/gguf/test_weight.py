"""kvik_gguf.weight.GGUFWeight.affine_blocks: the block-32 affine types as scales * codes + mins, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from kvik.entrypoints.onnx_exact_blocks import pack
from kvik_gguf.weight import GGUFWeight


def _weight(type_name: str, rows: int = 6, cols: int = 96) -> GGUFWeight:
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    ggml_type = gguf.GGMLQuantizationType[type_name]
    packed = gguf.quants.quantize(values, ggml_type)
    return GGUFWeight(torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).reshape(rows, -1)), int(ggml_type),
                      (rows, cols))  # fmt: skip


@pytest.mark.parametrize("type_name, bits, zero_point", [("Q4_0", 4, 8), ("Q4_1", 4, None), ("Q8_0", 8, 128)])
def test_blocks_decode_to_the_dequantized_values(type_name: str, bits: int, zero_point: int | None) -> None:
    weight = _weight(type_name)
    blocks = weight.affine_blocks()
    assert blocks is not None and blocks.bits == bits and blocks.zero_point() == zero_point
    assert blocks.codes.dtype == np.uint8 and int(blocks.codes.max()) < 1 << bits
    rows, cols = weight.shape
    values = blocks.scales[..., None] * blocks.codes.reshape(rows, cols // 32, 32) + blocks.mins[..., None]
    np.testing.assert_array_equal(values.reshape(rows, cols), weight.dequantize(torch.float32).numpy())


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1", "F16"])
def test_other_encodings_have_no_affine_blocks(type_name: str) -> None:
    assert _weight(type_name).affine_blocks() is None


def test_packing_puts_element_2i_in_the_low_nibble() -> None:
    blocks = _weight("Q4_0", rows=1, cols=96).affine_blocks()
    assert blocks is not None
    b, scales, zp = pack(blocks, 8)
    codes = blocks.codes.reshape(1, 3, 32)
    assert b.shape == (1, 3, 16) and scales.shape == (1, 3)
    np.testing.assert_array_equal(b & 0x0F, codes[..., 0::2])
    np.testing.assert_array_equal(b >> 4, codes[..., 1::2])
    assert zp.tolist() == [[0x88, 0x08]]  # three blocks: two nibbles, then one and the padding
