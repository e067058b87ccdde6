"""FP8 W8A8: the quantizers' invariants, the reference matmul, and each checkpoint layout through the conformance check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.layers.linear import Linear
from kvik.testing.conformance.quantization import check_quantization_method
from kvik_quant import fp8_ops as ops
from kvik_quant.fp8 import Fp8LinearMethod

# Activations are quantized too (W8A8), so apply(x) differs from x @ dequantize().T by about
# e4m3's relative precision (2^-4) times the accumulation's sqrt(K) cancellation: 5% is generous.
W8A8_RTOL = 0.05


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**16), zero_row=st.booleans())
def test_per_channel_and_per_token_round_trip(rows: int, cols: int, seed: int, zero_row: bool) -> None:
    """Every element is within half an e4m3 step (relative 2^-4) of its row's scale-normalised value."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    if zero_row:
        w[0] = 0
    for quantize, scale_of in (
        (ops.quantize_weight_per_channel, lambda s: s[:, None]),
        (ops.quantize_per_token, lambda s: s),
    ):
        q, scale = quantize(w)
        assert q.dtype == ops.FP8 and torch.isfinite(q.float()).all()
        back = q.float() * scale_of(scale)
        rowmax = w.abs().amax(dim=1, keepdim=True)
        assert torch.all((back - w).abs() <= rowmax * 2.0**-4 + 1e-30)
        assert torch.all(back.abs().amax(dim=1, keepdim=True) <= rowmax * (1 + 2.0**-4))
    if zero_row:
        assert torch.all(ops.quantize_weight_per_channel(w)[0][0].float() == 0)


def test_per_token_group_scales_each_group() -> None:
    x = torch.randn(3, 256)
    x[:, 128:] *= 100
    q, scale = ops.quantize_per_token_group(x, 128)
    assert scale.shape == (3, 2) and torch.all(scale[:, 1] > 50 * scale[:, 0])
    back = q.float() * scale.repeat_interleave(128, dim=1)
    assert torch.allclose(back, x, rtol=2.0**-4, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        {},  # online quantization="fp8": per-channel scales made at load
        {"quant_method": "fp8", "activation_scheme": "dynamic"},  # per-tensor weight_scale per shard
        {"quant_method": "fp8", "activation_scheme": "static"},  # + calibrated input_scale
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]},
    ],
    ids=["online", "per-tensor", "static", "block"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conformance(config: dict, dtype: torch.dtype) -> None:
    rtol = W8A8_RTOL if dtype == torch.float32 else 0.08  # bf16 adds its own 2^-8 rounding per operand
    shapes = [(64, [48]), (64, [64, 32, 32]), (96, [64, 64])]
    check_quantization_method(Fp8LinearMethod, config, shapes=shapes, dtype=dtype, rtol=rtol, max_weight_rel_error=0.05)


def test_reference_emulates_activation_quantization() -> None:
    """apply() is exactly dequant(quant(x)) @ dequant(W).T: the CPU path a GPU run is checked against."""
    method = Fp8LinearMethod()
    layer = Linear(64, [32, 32], quant_method=method, dtype=torch.float32)
    w = torch.randn(64, 64)
    layer.load("weight", w[:32], 0)
    layer.load("weight", w[32:], 1)
    method.process_weights_after_loading(layer)
    assert layer.weight.dtype == ops.FP8 and layer.weight_scale.shape == (64,)
    x = torch.randn(5, 64)
    xq, xs = ops.quantize_per_token(x)
    expected = (xq.float() * xs) @ (layer.weight.float() * layer.weight_scale[:, None]).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    # Per-token: scaling one row of x changes only that row's scale, not the others' quantization.
    x2 = x.clone()
    x2[0] *= 1000
    torch.testing.assert_close(layer(x2)[1:], layer(x)[1:])


def test_static_scales_of_merged_shards_take_their_max() -> None:
    method = Fp8LinearMethod.from_config({"quant_method": "fp8", "activation_scheme": "static"})
    layer = Linear(32, [16, 16], quant_method=method)
    for shard, s in enumerate((0.01, 0.03)):
        values = method.quantize_for_test(torch.randn(16, 32))
        values["input_scale"] = torch.tensor([s])
        for name, value in values.items():
            layer.load(name, value, shard)
    method.process_weights_after_loading(layer)
    assert float(layer.input_scale) == pytest.approx(0.03)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="activation_scheme"):
        Fp8LinearMethod.from_config({"quant_method": "fp8", "activation_scheme": "per-group"})
    with pytest.raises(ValueError, match="weight_block_size"):
        Fp8LinearMethod.from_config({"quant_method": "fp8", "weight_block_size": [128]})
    with pytest.raises(ValueError, match="fmt"):
        Fp8LinearMethod.from_config({"quant_method": "fp8", "fmt": "e5m2"})


def test_refused_on_cpu_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVIK_QUANT_EMULATE", raising=False)
    (reason,) = Fp8LinearMethod().validate_device(torch.device("cpu"))
    assert "'fp8'" in reason and "cannot run on cpu" in reason and "compute capability >= 8.9" in reason
    assert "quantized_weights='dequantize'" not in reason  # online: nothing to dequantize
    (reason,) = Fp8LinearMethod.from_config({"quant_method": "fp8"}).validate_device(torch.device("cpu"))
    assert "quantized_weights='dequantize'" in reason
    monkeypatch.setenv("KVIK_QUANT_EMULATE", "1")
    assert Fp8LinearMethod().validate_device(torch.device("cpu")) == []


def test_states_its_row_quantization_only_for_per_token_kernel_rows() -> None:
    """Per-channel weights with dynamic per-token scales on the kernels' GEMM path: the rows a fused producer may
    quantize; block-scaled weights (per-group activations), static scales and decode sizes: none. What it hands
    over gives apply()'s result."""
    from kvik.quantization.base import RowQuantization
    from kvik_quant.fp8 import W8A16_MAX_ROWS

    method = Fp8LinearMethod()
    layer = Linear(32, 16, quant_method=method)
    layer.load("weight", torch.randn(16, 32))
    method.process_weights_after_loading(layer)
    assert method.input_row_quantization(layer, 64) is None  # no FP8 kernel on the CPU
    layer.fp8_kernel = True
    assert method.input_row_quantization(layer, W8A16_MAX_ROWS) is None
    assert method.input_row_quantization(layer, W8A16_MAX_ROWS + 1) == RowQuantization(ops.FP8, ops.FP8_MAX, ops.MIN_SCALE)
    assert Fp8LinearMethod(static_activations=True).input_row_quantization(layer, 64) is None
    assert Fp8LinearMethod(serialized=True, block=(128, 128)).input_row_quantization(layer, 64) is None
    layer.fp8_kernel = False
    x = torch.randn(5, 32)
    codes, scales = ops.quantize_per_token(x)
    assert torch.equal(method.apply_quantized_rows(layer, codes, scales, torch.float32), layer(x))
