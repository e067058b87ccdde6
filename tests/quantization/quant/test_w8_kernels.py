"""The 8-bit-weight Triton kernels (under TRITON_INTERPRET=1 on CPU) against the torch references, and the
FP8/INT8 layers forced onto their GPU paths."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")

from kvik.layers.linear import Linear
from kvik_quant import fp8_ops as ops
from kvik_quant import int8, splitk
from kvik_quant.fp8 import Fp8LinearMethod
from kvik_quant.int8 import Int8LinearMethod, quantize_rows
from kvik_quant.w8_kernels import Int8GemmConfig, W8GemvConfig, int8_gemm, int8_gemm_config, w8a16_gemv

# CPU tensors through Triton need the interpreter, which conftest sets only where no GPU is present; on a GPU
# machine the kernels are checked on the device by test_int8_gemm_gpu.py and the quant sweep's numerics.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs Triton on CPU tensors under the interpreter (set TRITON_INTERPRET=1 to run it on a GPU machine)",
)


def _weights(kind: str, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=gen)
    if kind == "fp8":
        return ops.quantize_weight_per_channel(w)
    q, scale = quantize_rows(w)
    return q, scale.reshape(-1)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize(
    ("m", "k", "n", "dtype", "split_k", "prefetch", "reduce_each"),
    [
        (1, 300, 40, torch.float32, 0, True, True),  # K not a multiple of the k-tile, ragged column tile
        (1, 300, 40, torch.float32, 2, False, False),
        (1, 256, 64, torch.float16, 3, True, False),
        (1, 256, 64, torch.float16, 3, False, True),
        (6, 256, 48, torch.float32, 2, True, True),  # tl.dot path
        (16, 128, 32, torch.float16, 1, True, True),
    ],
)
def test_w8a16_gemv_matches_reference(
    kind: str, m: int, k: int, n: int, dtype: torch.dtype, split_k: int, prefetch: bool, reduce_each: bool
) -> None:
    """W8A16: the activations are not quantized, so the result is x @ dequantized(W).T up to accumulation order."""
    gen = torch.Generator().manual_seed(m + k)
    wq, ws = _weights(kind, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    expected = x.float() @ (wq.float() * ws[:, None]).T
    cfg = W8GemvConfig(block_n=16, block_k=64, split_k=split_k, prefetch=prefetch, reduce_each=reduce_each)
    got = w8a16_gemv(x, wq, ws, num_sms=8, config=cfg)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert torch.equal(w8a16_gemv(x, wq, ws, num_sms=8, config=cfg), got)  # deterministic split-K
    assert int(splitk.counters(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize(("k", "split_k", "unroll"), [(704, 1, 4), (704, 2, 4), (320, 1, 8), (1024, 3, 2)])
def test_w8a16_one_row_unrolled_gives_the_plain_loops_bits(kind: str, k: int, split_k: int, unroll: int) -> None:
    """k-steps taken ``unroll`` at a time (ragged last iteration, split K) sum each lane in the plain loop's
    order: the same bits, so a config's unroll changes speed only."""
    gen = torch.Generator().manual_seed(k + unroll)
    wq, ws = _weights(kind, 36, k, gen)
    x = torch.randn(1, k, generator=gen).to(torch.float16)
    base = W8GemvConfig(block_n=2, block_k=64, split_k=split_k, num_warps=1, num_stages=1, prefetch=False,
                        reduce_each=False)  # fmt: skip
    plain = w8a16_gemv(x, wq, ws, num_sms=8, config=base)
    unrolled = w8a16_gemv(x, wq, ws, num_sms=8, config=dataclasses.replace(base, unroll=unroll))
    assert torch.equal(unrolled, plain)
    expected = x.float() @ (wq.float() * ws[:, None]).T
    torch.testing.assert_close(plain.float(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


@pytest.mark.parametrize(("m", "k", "n"), [(3, 256, 64), (40, 200, 72), (37, 192, 80), (19, 208, 40)])
# K = 200 takes the plain loads either way (TMA needs 16 | K); K = 208 ends in a partial k-tile that TMA zero-pads.
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])  # 3 over 3 or 4 k-tiles: uneven splits, the last one empty with 4
def test_int8_gemm_is_exact_int32_accumulation_then_rescale(m: int, k: int, n: int, tma: bool, split_k: int) -> None:
    """Any split of K gives the unsplit kernel's bits: the int32 partials are added before the rescale."""
    gen = torch.Generator().manual_seed(m)
    wq, ws = _weights("int8", n, k, gen)
    xq, xs = quantize_rows(torch.randn(m, k, generator=gen))
    acc = xq.long() @ wq.long().T  # exact integer product
    expected = acc.float() * xs * ws[None, :]
    cfg = Int8GemmConfig(block_m=16, block_n=32, block_k=64, group_m=2, tma=tma, split_k=split_k)
    got = int8_gemm(xq, xs, wq, ws, torch.float32, cfg)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    if split_k > 1:
        assert torch.equal(got, int8_gemm(xq, xs, wq, ws, torch.float32, dataclasses.replace(cfg, split_k=1)))
        assert torch.equal(got, int8_gemm(xq, xs, wq, ws, torch.float32, cfg))  # the counters were reset
    assert int8_gemm_config(1, 4096).block_m <= int8_gemm_config(4096, 4096).block_m
    assert int8_gemm_config(256, 4096).block_n < int8_gemm_config(256, 28672).block_n  # wide outputs, wider tiles
    assert all(int8_gemm_config(m, 4096).tma for m in (1, 256, 4096))
    # K-heavy projections (the 8B's down: 14,336 -> 4,096) split K at decode-sized batches only.
    assert [int8_gemm_config(m, 4096, 14336).split_k for m in (17, 64, 65, 256, 257)] == [4, 4, 2, 2, 1]
    assert int8_gemm_config(256, 6144, 4096).split_k == 1


def test_int8_plan() -> None:
    assert int8.plan(1, static=False) == int8.plan(16, static=False) == "w8a16"
    assert int8.plan(1, static=True) == "triton"  # calibrated scales keep W8A8 semantics
    assert int8.plan(17, static=False) == "triton"


@pytest.mark.parametrize("rows", [2, 24])  # the W8A16 GEMV, then act-quant + the int8 GEMM
def test_int8_layer_kernel_paths_match_reference(rows: int) -> None:
    method = Int8LinearMethod()
    layer = Linear(64, [32, 32], quant_method=method)
    gen = torch.Generator().manual_seed(rows)
    layer.load("weight", torch.randn(32, 64, generator=gen), 0)
    layer.load("weight", torch.randn(32, 64, generator=gen), 1)
    method.process_weights_after_loading(layer)
    x = torch.randn(rows, 64, generator=gen)
    reference = layer(x)  # CPU: the reference path (W8A8)
    layer.int8_kernel = True
    got = layer(x)
    if rows <= int8.W8A16_MAX_ROWS:  # no activation quantization: closer to the dense product than W8A8
        dense = x @ (layer.weight.float() * layer.weight_scale[:, None]).T
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got, reference, rtol=0.02, atol=0.02 * float(reference.abs().max()))
    else:
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-4)


def test_fp8_layer_decode_runs_w8a16() -> None:
    method = Fp8LinearMethod()
    layer = Linear(64, [32, 32], quant_method=method, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    layer.load("weight", torch.randn(32, 64, generator=gen), 0)
    layer.load("weight", torch.randn(32, 64, generator=gen), 1)
    method.process_weights_after_loading(layer)
    x = torch.randn(3, 64, generator=gen)
    w8a8 = layer(x)  # CPU reference: activations quantized to e4m3
    layer.fp8_kernel = True  # M = 3 <= W8A16_MAX_ROWS: the GEMV, no activation quantization
    got = layer(x)
    dense = x @ (layer.weight.float() * layer.weight_scale[:, None]).T
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, w8a8, rtol=0.05, atol=0.05 * float(w8a8.abs().max()))


def test_a_kernel_that_fails_falls_back_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A fast path that does not compile on some GPU logs a warning and the previous path serves from then on."""
    from kvik_quant import fallback, w8_kernels

    monkeypatch.setattr(fallback, "_broken", set())
    calls = []

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(w8_kernels, "w8a16_gemv", broken)
    method = Int8LinearMethod()
    layer = Linear(64, 32, quant_method=method)
    layer.load("weight", torch.randn(32, 64, generator=torch.Generator().manual_seed(5)))
    method.process_weights_after_loading(layer)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))
    reference = layer(x)
    layer.int8_kernel = True
    for _ in range(2):
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-4)  # W8A8 through the int8 GEMM
    assert len(calls) == 1 and fallback.broken() == {"int8 w8a16 gemv"}
    assert "int8 w8a16 gemv kernel failed" in caplog.text
