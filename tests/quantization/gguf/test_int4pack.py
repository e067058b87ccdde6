"""GGUF blocks repacked for torch's CPU int4 kernel agree with the dequantized reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from kvik.layers.linear import Linear
from kvik_gguf import int4pack
from kvik_gguf.dequant import dequantize
from kvik_gguf.method import GGUFLinearMethod
from kvik_gguf.weight import GGUFWeight

pytestmark = pytest.mark.skipif(not int4pack.kernel_available(), reason="this torch has no CPU int4 kernel")

ROWS, COLS = 96, 512
_K_TYPES = {"Q4_K", "Q5_K"}  # gguf-py cannot quantize these: random blocks with finite scales


def _raw(type_name: str, rng: np.random.Generator) -> torch.Tensor:
    qtype = GGMLQuantizationType[type_name]
    if type_name in _K_TYPES:
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(ROWS * COLS // block, size), dtype=np.uint8)
        for offset in (0, 2):  # d and dmin
            raw[:, offset : offset + 2] = (
                (rng.uniform(-1, 1, raw.shape[0]) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
            )
        return torch.from_numpy(raw.reshape(ROWS, -1))
    values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    values[0, :32] = 0.0  # an all-zero block
    values[1] *= 100.0  # a large-scale row
    return torch.from_numpy(gguf.quants.quantize(values, qtype).view(np.uint8).reshape(ROWS, -1).copy())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0"])
def test_kernel_matches_dequantized_reference(type_name: str) -> None:
    rng = np.random.default_rng(0)
    qtype = int(GGMLQuantizationType[type_name])
    raw = _raw(type_name, rng)
    reference = dequantize(raw, qtype, (ROWS, COLS))
    packed = int4pack.repack(raw, qtype, ROWS, COLS, torch.float32)
    assert packed.planes == (1 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 2)
    x = torch.from_numpy(rng.standard_normal((7, COLS)).astype(np.float32))
    expected = (x.double() @ reference.double().t()).float()
    out = packed.matmul(x)
    # float32 reassociation only: the same bound a dense float32 matmul meets
    dense = F.linear(x, reference)
    scale = (x.abs().double() @ reference.abs().double().t()).float()  # sum of |products|
    bound = 4 * COLS * torch.finfo(torch.float32).eps * scale + 1e-30
    assert ((out - expected).abs() <= bound).all()
    assert ((dense - expected).abs() <= bound).all()
    # The weight the kernel holds (the kernel applied to I is W^T): Q4_0 (zero 0) bit for bit,
    # the others up to the one rounding of their zero (and of the sum of two planes).
    held = packed.matmul(torch.eye(COLS)).t()
    if type_name == "Q4_0":
        assert torch.equal(held, reference)
    else:
        torch.testing.assert_close(held, reference, rtol=2e-6, atol=2e-6 * reference.abs().max().item())
    # a 3-d input keeps its leading shape
    assert packed.matmul(x.reshape(7, 1, COLS)).shape == (7, 1, ROWS)


def test_unpackable_types_stay_on_the_decoding_path() -> None:
    """Q6_K has 16-value scale groups: no exact 32-wide grouping, so the layer decodes it per call."""
    rng = np.random.default_rng(1)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]
    raw = rng.integers(0, 256, size=(ROWS * COLS // block, size), dtype=np.uint8)
    raw[:, 208:210] = (rng.uniform(-1, 1, raw.shape[0]) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    weight = GGUFWeight(torch.from_numpy(raw.reshape(ROWS, -1)), int(GGMLQuantizationType.Q6_K), (ROWS, COLS))
    assert not int4pack.packable(weight.ggml_type, COLS)
    layer = Linear(COLS, [ROWS], quant_method=GGUFLinearMethod())
    layer.load("weight", weight, None)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, COLS)
    torch.testing.assert_close(layer(x), F.linear(x, weight.dequantize()))
    assert layer.gguf_planes == [0]


def test_switch_off_keeps_raw_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    raw = _raw("Q4_1", rng)
    weight = GGUFWeight(raw, int(GGMLQuantizationType.Q4_1), (ROWS, COLS))
    x = torch.randn(2, COLS, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    outs = []
    for switch in ("0", "1"):
        monkeypatch.setenv("KVIK_GGUF_INT4_KERNEL", switch)
        layer = Linear(COLS, [ROWS], quant_method=GGUFLinearMethod())
        layer.load("weight", weight, None)
        layer.quant_method.process_weights_after_loading(layer)
        outs.append(layer(x))
        assert layer.gguf_planes == [0 if switch == "0" else 1]
    # bf16 weights (switch off) vs bf16 scales (kernel): outputs are ~sqrt(COLS) = 22 in size, where one bf16
    # step is 0.125, so the bound is relative to the output's scale.
    scale = outs[0].float().abs().max().item()
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=0.02, atol=0.02 * scale)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_repacking_in_row_chunks_gives_the_same_layout(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Large weights (a tied LM head) repack CHUNK_ROWS rows at a time to bound the int32 intermediates.
    qtype = int(GGMLQuantizationType[type_name])
    raw = _raw(type_name, np.random.default_rng(1))
    whole = int4pack.repack(raw, qtype, ROWS, COLS, torch.bfloat16)
    monkeypatch.setattr(int4pack, "CHUNK_ROWS", 64)  # 96 rows: one 64-row chunk and a 32-row rest
    chunked = int4pack.repack(raw, qtype, ROWS, COLS, torch.bfloat16)
    assert torch.equal(chunked.weight, whole.weight) and torch.equal(chunked.scales_zeros, whole.scales_zeros)
    assert chunked.planes == whole.planes


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0"])
def test_rows_decode_bit_for_bit_like_the_dense_dequantization(type_name: str) -> None:
    # A tied head packed with lookups serves the token embedding: its rows must be the dense embedding's bits.
    if not int4pack.layout_understood():
        pytest.skip("this torch packs the int4 weight in another layout (lookups are not offered)")
    rng = np.random.default_rng(7)
    raw = torch.cat([_raw(type_name, rng), _raw(type_name, rng)[:32]])  # 128 rows: two whole 64-row tiles
    rows = raw.shape[0]
    qtype = int(GGMLQuantizationType[type_name])
    packed = int4pack.repack(raw, qtype, rows, COLS, torch.bfloat16, lookups=True)
    for dtype in (torch.bfloat16, torch.float32):
        dense = dequantize(raw, qtype, (rows, COLS), dtype)
        assert torch.equal(packed.rows(torch.arange(rows), dtype), dense)
    ids = torch.tensor([[5, 64, 5], [127, 0, 33]])  # any shape, repeats
    dense = dequantize(raw, qtype, (rows, COLS), torch.bfloat16)
    assert torch.equal(packed.rows(ids, torch.bfloat16), dense[ids])
    for row in (0, 31, 32, 63, 64, 127):  # one token (a decode step's lookup: its own path), each place in a tile
        assert torch.equal(packed.rows(torch.tensor([row]), torch.bfloat16), dense[row : row + 1])
    with pytest.raises(RuntimeError, match="lookups"):
        int4pack.repack(raw, qtype, rows, COLS, torch.bfloat16).rows(ids, torch.bfloat16)
