"""The one-row INT4 GEMV on a GPU, where its inline PTX runs (the interpreter runs the plain-Triton twin)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(("k", "n", "group"), [(4096, 6144, 128), (14336, 4096, 128), (512, 200, 32), (768, 64, -1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("split_k", [0, 3])
def test_row_kernel_matches_reference(k: int, n: int, group: int, dtype: torch.dtype, split_k: int) -> None:
    from kvik_quant import int4_pack as pack
    from kvik_quant import splitk
    from kvik_quant.int4 import rtn_quantize
    from kvik_quant.int4_gemv_kernel import ROW_DEFAULT, int4_gemv

    g = k if group == -1 else group
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    codes, scales, zeros = rtn_quantize(torch.randn(n, k, device="cuda", generator=gen), g, symmetric=False)
    s, z = scales.t().to(dtype).contiguous(), zeros.t().to(dtype).contiguous()
    x = torch.randn(1, k, device="cuda", generator=gen).to(dtype)
    expected = x.double() @ pack.dequantize_codes(codes.t(), s, z, g, torch.float64)
    cfg = replace(ROW_DEFAULT, split_k=split_k)
    got = int4_gemv(x, pack.pack_rows(codes.t()), s, z, g, splitk.num_sms(x.device), cfg)
    assert got.dtype == dtype and got.shape == (1, n)
    scale = float(expected.abs().max())
    # Within the output dtype's rounding, plus float32 summation error (16-bit x: ~2**10 more, the fp16 offset
    # left in the codes).
    tol = {torch.bfloat16: 2**-8 + 5e-5, torch.float16: 2**-11 + 5e-5, torch.float32: 1e-6}[dtype]
    assert float((got.double() - expected).abs().max()) <= tol * scale
    torch.cuda.synchronize()
    assert int(splitk.counters(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_kernel_matches_reference(m: int, dtype: torch.dtype) -> None:
    from kvik_quant import int4_pack as pack
    from kvik_quant import splitk
    from kvik_quant.int4 import rtn_quantize
    from kvik_quant.int4_gemv_kernel import int4_gemv

    k, n, g = 4096, 6144, 128
    gen = torch.Generator(device="cuda").manual_seed(m)
    codes, scales, zeros = rtn_quantize(torch.randn(n, k, device="cuda", generator=gen), g, symmetric=False)
    s, z = scales.t().to(dtype).contiguous(), zeros.t().to(dtype).contiguous()
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    expected = x.double() @ pack.dequantize_codes(codes.t(), s, z, g, torch.float64)
    got = int4_gemv(x, pack.pack_rows(codes.t()), s, z, g, splitk.num_sms(x.device), kernel="rows")
    tol = {torch.bfloat16: 2**-8 + 5e-5, torch.float16: 2**-11 + 5e-5}[dtype]
    assert float((got.double() - expected).abs().max()) <= tol * float(expected.abs().max())
