"""INT8 W8A8: online and compressed-tensors layouts through the conformance check; the reference path's arithmetic."""

from __future__ import annotations

import pytest
import torch
from kvik.layers.linear import Linear
from kvik.testing.conformance.quantization import check_quantization_method
from kvik_quant.compressed_tensors import CompressedTensorsMethod
from kvik_quant.int8 import Int8LinearMethod, quantize_rows

SHAPES = [(64, [48]), (64, [64, 32, 32])]


def _ct_config(static: bool) -> dict:
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": not static,
            "strategy": "tensor" if static else "token"}  # fmt: skip
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": acts,
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}}}  # fmt: skip


def test_online_conformance() -> None:
    # int8 activations: ~0.4% relative rounding per element, well inside 2% of the output scale.
    check_quantization_method(Int8LinearMethod, {}, shapes=SHAPES, rtol=0.02, max_weight_rel_error=0.02)


@pytest.mark.parametrize("static", [False, True])
def test_compressed_tensors_conformance(static: bool) -> None:
    check_quantization_method(CompressedTensorsMethod, _ct_config(static), shapes=SHAPES, rtol=0.05,
                              max_weight_rel_error=0.02)  # fmt: skip


def test_reference_is_per_token_int8() -> None:
    method = Int8LinearMethod()
    layer = Linear(32, 16, quant_method=method)
    w = torch.randn(16, 32)
    layer.load("weight", w)
    method.process_weights_after_loading(layer)
    x = torch.randn(3, 32)
    xq, xs = quantize_rows(x)
    assert xq.dtype == torch.int8 and int(xq.abs().max()) == 127
    expected = (xq.float() * xs) @ (layer.weight.float() * layer.weight_scale[:, None]).T
    torch.testing.assert_close(layer(x), expected)


def test_states_its_row_quantization_where_its_gemm_runs() -> None:
    """A fused producer may quantize the input only on the CUDA kernels' GEMM path with dynamic scales; what
    it hands over then gives apply()'s result."""
    from kvik_quant.int8 import ROW_QUANTIZATION, W8A16_MAX_ROWS

    method = Int8LinearMethod()
    layer = Linear(32, 16, quant_method=method)
    layer.load("weight", torch.randn(16, 32))
    method.process_weights_after_loading(layer)
    assert not layer.int8_kernel and method.input_row_quantization(layer, 64) is None  # the CPU reference
    layer.int8_kernel = True  # as on a GPU
    assert method.input_row_quantization(layer, W8A16_MAX_ROWS) is None  # the W8A16 GEMV takes bf16 rows
    assert method.input_row_quantization(layer, W8A16_MAX_ROWS + 1) == ROW_QUANTIZATION
    assert Int8LinearMethod(static_activations=True).input_row_quantization(layer, 64) is None
    assert CompressedTensorsMethod(method).input_row_quantization(layer, 64) == ROW_QUANTIZATION
    layer.int8_kernel = False
    x = torch.randn(5, 32)
    codes, scales = quantize_rows(x)
    assert torch.equal(method.apply_quantized_rows(layer, codes, scales, torch.float32), layer(x))
