"""The INT8 GEMM's K-split tiles on a GPU, on the 8B's shapes: the unsplit kernel's bits, and counters left at zero."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("m", [17, 64, 200, 256])
@pytest.mark.parametrize(("n", "k"), [(4096, 14336), (6144, 4096)])  # down (split), qkv (not)
def test_default_tiles_give_the_unsplit_bits(m: int, n: int, k: int) -> None:
    from kvik_quant import splitk
    from kvik_quant.int8 import quantize_rows
    from kvik_quant.w8_kernels import int8_gemm, int8_gemm_config

    gen = torch.Generator(device="cuda").manual_seed(m + n)
    w, ws = quantize_rows(torch.randn(n, k, device="cuda", generator=gen))
    xq, xs = quantize_rows(torch.randn(m, k, device="cuda", generator=gen))
    cfg = int8_gemm_config(m, n, k)
    assert (cfg.split_k > 1) == (k >= 2 * n)
    got = int8_gemm(xq, xs, w, ws.reshape(-1), torch.bfloat16, cfg)
    unsplit = int8_gemm(xq, xs, w, ws.reshape(-1), torch.bfloat16, dataclasses.replace(cfg, split_k=1))
    again = int8_gemm(xq, xs, w, ws.reshape(-1), torch.bfloat16, cfg)
    assert torch.equal(got, unsplit) and torch.equal(got, again)
    torch.cuda.synchronize()
    assert int(splitk.counters(xq.device, 1).abs().sum()) == 0
