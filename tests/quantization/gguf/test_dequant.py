"""kvik-gguf's torch decoders against gguf-py's numpy reference, type by type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from kvik_gguf.dequant import GGML_TYPES, dequantize, row_bytes, supported_type_names

# Byte offsets of the float16 super-block scales in the K-quant types gguf-py cannot quantize.
_K_SCALE_OFFSETS = {
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}


def _random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, bytes]`` of random blocks whose float16 scales are finite (what a quantizer would write)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS[qtype]:
        scale = (rng.uniform(-1, 1, size=raw.shape[0]) * 0.05).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def _reference_input(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in _K_SCALE_OFFSETS:
        return _random_blocks(qtype, rows, cols, rng)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    values[0, :32] = 0.0  # an all-zero block (scale 0) is a real corner case
    return gguf.quants.quantize(values, qtype)


@pytest.mark.parametrize("type_id", sorted(GGML_TYPES), ids=[GGML_TYPES[t][0] for t in sorted(GGML_TYPES)])
def test_matches_gguf_reference(type_id: int) -> None:
    qtype = GGMLQuantizationType(type_id)
    rng = np.random.default_rng(type_id)
    rows, cols = 6, 512
    packed = _reference_input(qtype, rows, cols, rng)
    expected = gguf.quants.dequantize(packed, qtype).astype(np.float32)
    raw = torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).reshape(rows, -1).copy())
    assert raw.shape[1] == row_bytes(type_id, cols)
    actual = dequantize(raw, type_id, (rows, cols)).numpy()
    assert expected.shape == actual.shape == (rows, cols)
    np.testing.assert_array_equal(actual, expected)  # same float32 operations in the same order


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decodes_to_compute_dtype(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    packed = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q4_1)
    raw = torch.from_numpy(packed.copy())
    out = dequantize(raw, int(GGMLQuantizationType.Q4_1), (4, 64), dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, dequantize(raw, int(GGMLQuantizationType.Q4_1), (4, 64)).to(dtype))


def test_unsupported_type_names_it_and_the_supported_ones() -> None:
    raw = torch.zeros(1, 66, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"IQ2_XXS.*supported types: .*Q4_K"):
        dequantize(raw, int(GGMLQuantizationType.IQ2_XXS), (1, 256))
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"} <= set(
        supported_type_names()
    )


def test_row_width_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        row_bytes(int(GGMLQuantizationType.Q4_K), 100)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "F16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_decoding_gives_the_same_values(
    type_name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tensors decode a slice of blocks at a time (no float32 copy of all of them at once): the values,
    and with ``out`` the values written into a given tensor, are exactly the one-shot decode's."""
    from kvik_gguf import dequant

    qtype = GGMLQuantizationType[type_name]
    rows, cols = 12, 512
    if qtype in _K_SCALE_OFFSETS:
        packed = _random_blocks(qtype, rows, cols, np.random.default_rng(5))
    else:
        values = np.random.default_rng(5).standard_normal((rows, cols)).astype(np.float32)
        packed = gguf.quants.quantize(values, qtype)
    raw = torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).reshape(rows, -1).copy())
    whole = dequantize(raw, int(qtype), (rows, cols)).to(dtype)  # one decode call (under CHUNK_VALUES)
    monkeypatch.setattr(dequant, "CHUNK_VALUES", 700)  # several chunks, not a multiple of the rows
    assert torch.equal(dequantize(raw, int(qtype), (rows, cols), dtype), whole)
    out = torch.full((rows, cols), float("nan"), dtype=dtype)
    assert dequantize(raw, int(qtype), (rows, cols), dtype, out=out) is out
    assert torch.equal(out, whole)
    with pytest.raises(ValueError, match="contiguous tensor of shape"):
        dequantize(raw, int(qtype), (rows, cols), dtype, out=torch.empty(cols, rows, dtype=dtype).t())
