"""GGUFLinearMethod: packed shards of mixed types, decoded per matmul."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from kvik.layers.linear import Linear
from kvik.testing.conformance.quantization import check_quantization_method
from kvik_gguf.method import GGUFLinearMethod
from kvik_gguf.weight import GGUFWeight


def _packed(weight: torch.Tensor, type_name: str) -> GGUFWeight:
    qtype = GGMLQuantizationType[type_name]
    data = gguf.quants.quantize(weight.numpy(), qtype).view(np.uint8).reshape(weight.shape[0], -1)
    return GGUFWeight(torch.from_numpy(data.copy()), int(qtype), tuple(weight.shape))


@pytest.mark.parametrize("test_type", ["Q8_0", "Q4_0", "Q5_1", "F16"])
def test_conformance(test_type: str) -> None:
    max_error = {"Q4_0": 0.25, "Q5_1": 0.1}.get(test_type, 0.02)
    check_quantization_method(GGUFLinearMethod, {"test_type": test_type}, max_weight_rel_error=max_error)


def test_merged_shards_of_different_types() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, 64, generator=gen) for rows in (64, 32, 32))
    layer = Linear(64, [64, 32, 32], quant_method=GGUFLinearMethod())
    layer.load("weight", _packed(q, "Q4_0"), 0)
    layer.load("weight", _packed(k, "Q8_0"), 1)
    layer.load("weight", v, 2)  # a dense value (an F32 tensor in the file) is kept as F32 rows
    layer.quant_method.process_weights_after_loading(layer)

    expected = torch.cat([_packed(q, "Q4_0").dequantize(), _packed(k, "Q8_0").dequantize(), v])
    dense = layer.quant_method.dequantize(layer)
    torch.testing.assert_close(dense, expected, rtol=0, atol=0)
    # storage before the first call: 18 + 34 bytes per 32 values for q/k, 4 bytes per value for v
    assert layer.quant_method.weight_bytes(layer) == 64 * 2 * 18 + 32 * 2 * 34 + 32 * 64 * 4
    x = torch.randn(5, 64, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, expected))
    assert layer.gguf_planes == [0, 0, 0]  # float32 stays on the exact decoding path
    # The first bf16 call repacks q (Q4_0, one int4 plane) and k (Q8_0, two planes) for the int4
    # kernel: half a byte per code plus a bf16 scale and zero per 32 codes; v stays float32 rows.
    torch.testing.assert_close(layer(x.bfloat16()).float(), F.linear(x, expected), rtol=0.05, atol=0.3)
    assert layer.gguf_planes == [1, 2, 0]
    assert layer.quant_method.weight_bytes(layer) == (64 * 32 + 2 * 64 * 4) + (32 * 64 + 4 * 32 * 4) + 32 * 64 * 4
    torch.testing.assert_close(layer.quant_method.dequantize(layer), expected, rtol=0.01, atol=0.02)
    torch.testing.assert_close(layer(x), F.linear(x, expected), rtol=0.02, atol=0.1)  # fp32 through bf16 scales


def test_same_type_shards_are_fused() -> None:
    gen = torch.Generator().manual_seed(1)
    gate, up = torch.randn(96, 64, generator=gen), torch.randn(96, 64, generator=gen)
    layer = Linear(64, [96, 96], quant_method=GGUFLinearMethod())
    layer.load("weight", _packed(gate, "Q4_1"), 0)
    layer.load("weight", _packed(up, "Q4_1"), 1)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.gguf_groups == [(192, int(GGMLQuantizationType.Q4_1))]
    expected = torch.cat([_packed(gate, "Q4_1").dequantize(), _packed(up, "Q4_1").dequantize()])
    torch.testing.assert_close(layer.quant_method.dequantize(layer), expected, rtol=0, atol=0)


def test_shape_and_missing_shard_errors() -> None:
    layer = Linear(64, [64, 32], quant_method=GGUFLinearMethod())
    with pytest.raises(ValueError, match=r"weight shape \(32, 64\) does not match expected \(64, 64\)"):
        layer.load("weight", _packed(torch.randn(32, 64), "Q8_0"), 0)
    layer.load("weight", _packed(torch.randn(64, 64), "Q8_0"), 0)
    with pytest.raises(ValueError, match=r"no weight for shard\(s\) \[1\]"):
        layer.quant_method.process_weights_after_loading(layer)
    with pytest.raises(ValueError, match=r"IQ2_XXS.*supported types"):
        layer.load("weight", GGUFWeight(torch.zeros(32, 66, dtype=torch.uint8), 16, (32, 256)), 1)
