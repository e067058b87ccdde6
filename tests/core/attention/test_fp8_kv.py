"""FP8 (e4m3) KV cache on the torch path: the reference quantizer, torch_ref's writes and reads, the option."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.attention import fp8_kv
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.config import EngineConfig, resolve_kv_cache_dtype
from kvik.testing.conformance.fp8_kv import check_fp8_kv_cache

E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_kv.FP8_DTYPE).float()
FINITE = E4M3_VALUES[~E4M3_VALUES.isnan()].unique()  # every finite e4m3 value, sorted


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e4, 1e4, allow_nan=False, width=32), st.sampled_from([0.01, 0.5, 1.0, 3.0]))
def test_quantize_rounds_to_the_nearest_e4m3_value_and_saturates(x: float, scale: float) -> None:
    stored = fp8_kv.quantize(torch.tensor([x]), scale).float().item()
    y = (torch.tensor([x], dtype=torch.float32) / scale).clamp(-448, 448).item()  # what quantize rounds
    nearest = FINITE[(FINITE - y).abs().argmin()].item()
    # A tie may go to either neighbour (the even mantissa wins): compare distances, not values.
    assert abs(stored - y) <= abs(nearest - y)
    assert abs(stored) <= 448
    back = fp8_kv.dequantize(fp8_kv.quantize(torch.tensor([x]), scale), scale, torch.float32).item()
    assert back == pytest.approx(stored * scale, rel=1e-6)


def test_quantize_is_idempotent_on_the_grid() -> None:
    again = fp8_kv.quantize(fp8_kv.dequantize(fp8_kv.quantize(FINITE, 2.0), 2.0, torch.float32), 2.0)
    assert torch.equal(again.float(), fp8_kv.quantize(FINITE, 2.0).float())
    assert torch.equal(fp8_kv.quantize(FINITE, 1.0).float(), FINITE)  # grid values are stored exactly


def test_write_slots_handles_fp8_and_model_dtype_caches() -> None:
    values = torch.randn(3, 2, 4)
    slots = torch.tensor([5, 0, 2])
    fp8 = torch.zeros(8, 2, 4, dtype=fp8_kv.FP8_DTYPE)  # index_copy_ has no CPU float8 kernel: a uint8 view
    fp8_kv.write_slots(fp8, slots, values, 0.5)
    assert torch.equal(fp8[slots].float(), fp8_kv.quantize(values, 0.5).float())
    assert fp8[[1, 3, 4, 6, 7]].float().abs().sum() == 0
    dense = torch.zeros(8, 2, 4)
    fp8_kv.write_slots(dense, slots, values, 0.5)  # scales apply to fp8 caches only
    assert torch.equal(dense[slots], values)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 4)])
def test_torch_ref_fp8_cache_matches_attention_over_the_dequantized_cache(window, heads, kv_heads) -> None:
    check_fp8_kv_cache(TorchRefAttentionBackend, num_heads=heads, num_kv_heads=kv_heads, window=window, seed=heads)


def test_torch_ref_fp8_cache_in_bfloat16() -> None:
    check_fp8_kv_cache(TorchRefAttentionBackend, dtype=torch.bfloat16, k_scale=0.02, v_scale=0.5)


def test_scales_from_a_checkpoint_must_be_positive() -> None:
    layer = TorchRefAttentionBackend(4, 32, 2, 0.1)
    assert (layer.k_scale, layer.v_scale, layer.kv_scales_from_checkpoint) == (1.0, 1.0, False)
    layer.set_kv_scale("k", 0.25)
    assert layer.k_scale == 0.25 and layer.kv_scales_from_checkpoint
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="k_scale must be a positive finite number"):
            layer.set_kv_scale("k", bad)


@pytest.mark.parametrize(("value", "resolved"), [("auto", "auto"), ("fp8", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3")])
def test_kv_cache_dtype_values(value: str, resolved: str) -> None:
    assert resolve_kv_cache_dtype(value) == resolved
    assert EngineConfig.from_kwargs(model="m", kv_cache_dtype=value).kv_cache_dtype == value  # vLLM's option name


@pytest.mark.parametrize("bad", ["fp4", "int8", "bfloat16", "fp8_e5m2", "", None, 8])
def test_bad_kv_cache_dtype_is_a_clear_error_at_config_time(bad: object) -> None:
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3', got") as info:
        EngineConfig(model="m", kv_cache_dtype=bad)  # type: ignore[arg-type]
    if bad == "fp8_e5m2":
        assert "e4m3 only" in str(info.value)
