"""SiLU-and-mul writing quantized rows (kvik_cuda.act_quant) against the two kernels it replaces, and the fused
MLP routing a W8A8 down projection's input through it. On CPU under Triton's interpreter (conftest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton", reason="triton is not installed")
pytest.importorskip("kvik_quant", reason="the kvik-quant plugin is not installed")

from kvik.layers.activation import SiluAndMul
from kvik.layers.linear import Linear
from kvik.models.llama import LlamaMLP
from kvik.quantization.base import RowQuantization
from kvik.quantization.unquantized import UnquantizedLinearMethod
from kvik_cuda.act_quant import silu_and_mul_quantized
from kvik_cuda.fused import FusedSiluAndMul, fuse_layers
from kvik_quant import act_quant_kernel
from kvik_quant.fp8 import ROW_QUANTIZATION as FP8  # the methods' own statements
from kvik_quant.int8 import ROW_QUANTIZATION as INT8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("spec", [INT8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 1000, 1536, 4100])  # 4100: passes over more than one column block
def test_codes_and_scales_are_the_two_kernels(spec: RowQuantization, dtype: torch.dtype, d: int) -> None:
    """The same bits as FusedSiluAndMul's output quantized by the method's own row kernel; a zero row takes the
    minimum scale."""
    torch.manual_seed(0)
    x = 3 * torch.randn(6, 2 * d, dtype=dtype, device=DEVICE)
    x[2] = 0
    out = silu_and_mul_quantized(x, spec)
    assert out is not None
    codes, scales = out
    want_codes, want_scales = act_quant_kernel.quantize_rows(
        FusedSiluAndMul()(x), spec.dtype, spec.qmax, spec.min_scale
    )
    assert codes.dtype == spec.dtype and scales.shape == (6, 1)
    assert torch.equal(scales, want_scales) and float(scales[2]) == pytest.approx(spec.min_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


def test_declines_what_it_does_not_cover() -> None:
    assert silu_and_mul_quantized(torch.zeros(2, 64, dtype=torch.float32), INT8) is None
    assert silu_and_mul_quantized(torch.zeros(0, 64, dtype=torch.bfloat16), INT8) is None


class _RowQuantizedMethod(UnquantizedLinearMethod):
    """Dense weights behind a W8A8-style interface: rows quantized per ``spec`` (when it states one for the
    row count), then a matmul of the dequantized rows."""

    def __init__(self, min_rows: int) -> None:
        self.min_rows = min_rows
        self.fused_calls = 0

    def input_row_quantization(self, layer: Linear, num_rows: int) -> RowQuantization | None:
        return INT8 if num_rows >= self.min_rows else None

    def apply_quantized_rows(
        self, layer: Linear, codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        self.fused_calls += 1
        return F.linear((codes.float() * scales).to(out_dtype), layer.weight)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.input_size)
        if self.input_row_quantization(layer, x2.shape[0]) is None:
            return super().apply(layer, x)
        codes, scales = act_quant_kernel.quantize_rows(x2, INT8.dtype, INT8.qmax, INT8.min_scale)
        return F.linear((codes.float() * scales).to(x.dtype), layer.weight).reshape(*x.shape[:-1], -1)


def _mlp(hidden: int, inter: int, method: UnquantizedLinearMethod) -> nn.Module:
    mlp = LlamaMLP.__new__(LlamaMLP)
    nn.Module.__init__(mlp)
    dtype = torch.bfloat16
    mlp.gate_up_proj = Linear(
        hidden, [inter, inter], quant_method=UnquantizedLinearMethod(), dtype=dtype, device=DEVICE
    )
    mlp.down_proj = Linear(inter, hidden, quant_method=method, dtype=dtype, device=DEVICE)
    mlp.act = SiluAndMul()
    gen = torch.Generator().manual_seed(0)
    mlp.gate_up_proj.weight.data = (0.2 * torch.randn(2 * inter, hidden, generator=gen)).to(dtype).to(DEVICE)
    mlp.down_proj.weight.data = (0.2 * torch.randn(hidden, inter, generator=gen)).to(dtype).to(DEVICE)
    fuse_layers(mlp)
    return mlp


@pytest.mark.parametrize("rows", [3, 40])
def test_fused_mlp_hands_the_down_projection_quantized_rows(rows: int) -> None:
    """Where the down projection states its row quantization the MLP's output is unchanged, its input made
    by one kernel; below the method's row threshold (a decode-size call) the usual path runs."""
    fused_method, plain_method = _RowQuantizedMethod(min_rows=17), _RowQuantizedMethod(min_rows=17)
    plain_method.input_row_quantization = lambda layer, num_rows: None  # type: ignore[method-assign]
    fused, plain = _mlp(64, 96, fused_method), _mlp(64, 96, plain_method)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    got = fused(x)
    if rows >= 17:
        plain.down_proj.quant_method = _RowQuantizedMethod(min_rows=17)  # quantizes in apply, as W8A8 does
    want = plain(x)
    assert fused_method.fused_calls == (1 if rows >= 17 else 0)
    assert got.shape == (rows, 64) and torch.equal(got, want)
