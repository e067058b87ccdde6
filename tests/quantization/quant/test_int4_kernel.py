"""The Triton INT4 dequantize-in-GEMM kernel (under TRITON_INTERPRET=1 on CPU) against the torch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvik.layers.linear import Linear
from kvik_quant import int4_pack as pack
from kvik_quant import splitk
from kvik_quant.int4 import GPTQLinearMethod, rtn_quantize
from kvik_quant.int4_gemv_kernel import GemvConfig, int4_dequantize, int4_gemv
from kvik_quant.int4_kernel import DEQUANT_MIN_ROWS, GEMV_MAX_ROWS, gemm_config, int4_matmul, plan


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
    got = int4_matmul(x, qweight, s, z, group, path="gemm")
    assert kvik_quant.int4_kernel._wide_load is wide_load  # the variant asked for ran (no fallback)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_small_batches_split_k_and_large_ones_do_not() -> None:
    assert gemm_config(1, 4096, 4096, 128, 132).split_k > 1
    assert gemm_config(4096, 4096, 4096, 128, 132).split_k == 1
    assert gemm_config(1, 4096, 4096, 32, 132).block_k == 32  # a k-tile never straddles a group


def test_plan_by_rows() -> None:
    assert plan(1) == plan(GEMV_MAX_ROWS) == "gemv"
    assert plan(GEMV_MAX_ROWS + 1) == "gemm"
    assert plan(DEQUANT_MIN_ROWS) == plan(4096) == "dequant"
    assert splitk.split_for(tiles=64, k_tiles=32, num_sms=132) == 8  # 512 programs >= 2 per SM
    assert splitk.split_for(tiles=448, k_tiles=32, num_sms=132) == 1  # gate_up fills the GPU alone
    assert splitk.split_for(tiles=1, k_tiles=2, num_sms=132) == 2  # never more splits than k-tiles


def test_gemv_config_table(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvik_quant.int4_gemv_kernel as kernel

    tuned = GemvConfig(block_n=32, block_k=64, split_k=2)
    monkeypatch.setattr(kernel, "GEMV_TABLE", {(64, 128, True): tuned})
    assert kernel.gemv_config(64, 128, 1) is tuned
    assert kernel.gemv_config(64, 128, 4) == GemvConfig()  # the tl.dot variant has no entry: the default
    assert kernel.gemv_config(64, 256, 1) == kernel.ROW_DEFAULT
    x, qweight, s, z, w_t = _problem(1, 128, 64, 32, torch.float32)
    torch.testing.assert_close(int4_gemv(x, qweight, s, z, 32, num_sms=8), x @ w_t, rtol=1e-4, atol=1e-3)


def _problem(m: int, k: int, n: int, group: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    codes, scales, zeros = rtn_quantize(torch.randn(n, k, generator=gen), group, symmetric=False)
    s, z = scales.t().to(dtype).contiguous(), zeros.t().to(dtype).contiguous()
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x, pack.pack_rows(codes.t()), s, z, pack.dequantize_codes(codes.t(), s, z, group, torch.float32)


@pytest.mark.parametrize(
    ("m", "k", "n", "group", "dtype", "split_k"),
    [
        (1, 512, 96, 128, torch.float32, 0),  # one row (exact codes for float32 x), split from the shape
        (1, 256, 64, 32, torch.float16, 3),  # a split that does not divide the k-tiles: one empty
        (1, 256, 40, 32, torch.bfloat16, 2),  # bf16 pairs, fp16's offset left in the codes; a ragged column tile
        (1, 160, 48, 160, torch.float16, 1),  # per channel: one 32-row k-step
        (5, 256, 64, 64, torch.float32, 4),  # the tl.dot path, ragged rows
        (16, 128, 48, 32, torch.float16, 1),  # no split: stored directly
    ],
)
def test_gemv_matches_reference(m: int, k: int, n: int, group: int, dtype: torch.dtype, split_k: int) -> None:
    x, qweight, s, z, w_t = _problem(m, k, n, group, dtype)
    expected = x.float() @ w_t
    cfg = GemvConfig(block_n=32, block_k=64, split_k=split_k)
    got = int4_gemv(x, qweight, s, z, group, num_sms=8, config=cfg)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    # Deterministic (partials added in split order) and the tile counters are back at zero for the next call.
    assert torch.equal(int4_gemv(x, qweight, s, z, group, num_sms=8, config=cfg), got)
    assert int(splitk.counters(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize(("group", "dtype"), [(32, torch.float16), (128, torch.float32)])
def test_dequantize_kernel_is_exactly_the_reference(group: int, dtype: torch.dtype) -> None:
    _, qweight, s, z, _ = _problem(1, 256, 160, group, dtype)
    codes = pack.unpack_rows(qweight)
    assert torch.equal(int4_dequantize(qweight, s, z, group, dtype), pack.dequantize_codes(codes, s, z, group, dtype))


@pytest.mark.parametrize(("m", "path"), [(3, "gemv"), (20, "gemm"), (DEQUANT_MIN_ROWS, "dequant")])
@pytest.mark.parametrize(("k", "group"), [(128, 32), (160, 160), (200, 200)])  # per-channel: G = K, not 2^n
def test_every_path_through_int4_matmul(m: int, path: str, k: int, group: int) -> None:
    x, qweight, s, z, w_t = _problem(m, k, 64, group, torch.float32, seed=m)
    assert plan(m) == path
    torch.testing.assert_close(int4_matmul(x, qweight, s, z, group), x @ w_t, rtol=1e-4, atol=1e-3)
    assert splitk.pow2_divisor(128, 160, 160) == 32 and splitk.pow2_divisor(128, 200) == 8


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
    for rows in (4, 40):  # the GEMV and the dequantize-in-GEMM paths
        x = torch.randn(rows, k, generator=gen)
        layer.int4_kernel = False
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


@pytest.mark.parametrize(
    ("m", "k", "n", "group", "dtype", "split_k"),
    [
        (2, 256, 64, 32, torch.float32, 2),  # exact codes for float32 x, split K
        (3, 512, 96, 128, torch.float16, 0),  # 3 rows in a 4-row program: the padding row reads row 2 again
        (4, 256, 40, 64, torch.bfloat16, 3),  # bf16 pairs; a ragged column tile, a split leaving one empty
    ],
)
def test_rows_kernel_matches_reference(m: int, k: int, n: int, group: int, dtype: torch.dtype, split_k: int) -> None:
    x, qweight, s, z, w_t = _problem(m, k, n, group, dtype, seed=m)
    expected = x.float() @ w_t
    cfg = GemvConfig(block_n=32, block_k=64, split_k=split_k, num_warps=1)
    got = int4_gemv(x, qweight, s, z, group, num_sms=8, config=cfg, kernel="rows")
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert torch.equal(int4_gemv(x, qweight, s, z, group, num_sms=8, config=cfg, kernel="rows"), got)
    assert int(splitk.counters(x.device, 1).abs().sum()) == 0
    with pytest.raises(ValueError, match="2 to 4 rows"):
        int4_gemv(x.repeat(3, 1)[:5], qweight, s, z, group, num_sms=8, config=cfg, kernel="rows")


def test_two_rows_take_the_rows_kernel_by_default() -> None:
    """Up to ROW_MAX_ROWS rows (measured faster there) int4_gemv runs the rows kernel with ROWS_DEFAULT."""
    from kvik_quant import int4_gemv_kernel as kernel

    x, qweight, s, z, _ = _problem(kernel.ROW_MAX_ROWS, 256, 64, 64, torch.bfloat16, seed=9)
    forced = int4_gemv(x, qweight, s, z, 64, num_sms=8, config=kernel.ROWS_DEFAULT, kernel="rows")
    assert torch.equal(int4_gemv(x, qweight, s, z, 64, num_sms=8), forced)
