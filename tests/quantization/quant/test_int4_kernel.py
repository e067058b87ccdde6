"""The Triton INT4 dequantize-in-GEMM kernel (under TRITON_INTERPRET=1 on CPU) against the torch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvik.layers.linear import Linear
from kvik_quant import int4_pack as pack
from kvik_quant.int4 import GPTQLinearMethod, rtn_quantize
from kvik_quant.int4_kernel import _config, int4_matmul


@pytest.mark.parametrize(
    ("m", "k", "n", "group", "dtype"),
    [
        (1, 256, 64, 128, torch.float32),  # decode: split-K partial sums
        (5, 128, 96, 32, torch.float32),
        (20, 64, 64, 64, torch.float16),  # a ragged M tile
    ],
)
@pytest.mark.parametrize("wide_load", [True, False])
def test_kernel_matches_reference(
    m: int, k: int, n: int, group: int, dtype: torch.dtype, wide_load: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvik_quant.int4_kernel

    monkeypatch.setattr(kvik_quant.int4_kernel, "_wide_load", wide_load)
    # bfloat16 is checked on the GPU (benchmarks/quant_benchmark.py): Triton 3.9's interpreter computes
    # garbage for bf16 tl.dot operands on the CPU, whatever the kernel.
    gen = torch.Generator().manual_seed(m * 1000 + k)
    codes, scales, zeros = rtn_quantize(torch.randn(n, k, generator=gen), group, symmetric=False)
    qweight = pack.pack_rows(codes.t())
    s, z = scales.t().to(dtype).contiguous(), zeros.t().to(dtype).contiguous()
    x = torch.randn(m, k, generator=gen).to(dtype)
    w_t = pack.dequantize_codes(codes.t(), s, z, group, torch.float32)
    expected = x.float() @ w_t
    got = int4_matmul(x, qweight, s, z, group)
    assert kvik_quant.int4_kernel._wide_load is wide_load  # the variant asked for ran (no fallback)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_small_batches_split_k_and_large_ones_do_not() -> None:
    assert _config(1, 4096, 4096, 128, 132)[3] > 1
    assert _config(4096, 4096, 4096, 128, 132)[3] == 1
    assert _config(1, 4096, 4096, 32, 132)[2] == 32  # a k-tile never straddles a group


def test_layer_runs_the_kernel_with_act_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPTQ layer with a permuted g_idx, forced onto the kernel path, equals its reference path."""
    k, n, g = 128, 64, 32
    gen = torch.Generator().manual_seed(1)
    method = GPTQLinearMethod(g)
    layer = Linear(k, n, quant_method=method)
    values = method.quantize_for_test(torch.randn(n, k, generator=gen))
    values["g_idx"] = values["g_idx"][torch.randperm(k, generator=gen)]  # still g inputs per group
    for name, value in values.items():
        layer.load(name, value)
    method.process_weights_after_loading(layer)
    x = torch.randn(4, k, generator=gen)
    reference = layer(x)
    layer.int4_kernel = True
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)


def test_activation_quant_kernel_matches_torch_int8() -> None:
    """The one-kernel per-token quantizer (INT8 codes here: Triton's CPU interpreter converts to float8
    inexactly, so its FP8 output is checked on the GPU by benchmarks/quant_benchmark.py)."""
    from kvik_quant.act_quant_kernel import quantize_rows as kernel_rows
    from kvik_quant.int8 import quantize_rows

    x = torch.randn(3, 2500, generator=torch.Generator().manual_seed(2)) * 4
    x[1] = 0  # an all-zero row keeps a finite scale
    q, scale = kernel_rows(x, torch.int8, 127.0, 1e-10)
    q_ref, scale_ref = quantize_rows(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
