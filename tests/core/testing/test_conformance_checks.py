"""The conformance checks accept correct plugins and reject broken ones with precise reasons."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kvik.config import EngineConfig, ModelConfig, ResolvedConfig
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.quantization.base import QuantizationMethod, RowQuantization
from kvik.quantization.unquantized import UnquantizedLinearMethod
from kvik.testing.conformance.platform import check_platform
from kvik.testing.conformance.quantization import check_quantization_method


class RowInt8(QuantizationMethod):
    """Symmetric per-output-row int8: a real quantized method written for this test."""

    name = "row_int8"

    def create_weights(self, layer, dtype, device) -> None:
        out = sum(layer.output_sizes)
        layer.register_buffer("qweight", torch.zeros(out, layer.input_size, dtype=torch.int8, device=device))
        layer.register_buffer("scales", torch.ones(out, dtype=torch.float32, device=device))
        layer.compute_dtype = dtype

    def _rows(self, layer, shard):
        start = sum(layer.output_sizes[:shard]) if shard is not None else 0
        size = layer.output_sizes[shard] if shard is not None else sum(layer.output_sizes)
        return slice(start, start + size)

    def load_weight(self, layer, name: str, value: Any, shard: int | None) -> None:
        getattr(layer, {"qweight": "qweight", "scales": "scales"}[name])[self._rows(layer, shard)].copy_(value)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ layer.qweight.float().T * layer.scales).to(x.dtype)

    def dequantize(self, layer) -> torch.Tensor:
        return (layer.qweight.float() * layer.scales[:, None]).to(layer.compute_dtype)

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        return {"qweight": torch.round(weight / scales[:, None]).to(torch.int8), "scales": scales}


class ForgetsScales(RowInt8):
    def apply(self, layer, x):
        return (x.float() @ layer.qweight.float().T).to(x.dtype)


class IgnoresShard(RowInt8):
    def load_weight(self, layer, name, value, shard):
        getattr(layer, name)[: value.shape[0]].copy_(value)  # every shard lands on the first rows


class NoTestQuantizer(RowInt8):
    quantize_for_test = QuantizationMethod.quantize_for_test


class W8A8(RowInt8):
    """Activations quantized per row as stated (from 2 rows on), then an exact integer product, rescaled."""

    ROWS = RowQuantization(torch.int8, 127.0, 1e-10)

    def input_row_quantization(self, layer, num_rows):
        return self.ROWS if num_rows >= 2 else None

    def apply(self, layer, x):
        rows = x.reshape(-1, layer.input_size)
        if self.input_row_quantization(layer, rows.shape[0]) is None:
            return super().apply(layer, x)
        return self._product(layer, *self.ROWS.quantize(rows), x.dtype).reshape(*x.shape[:-1], -1)

    def apply_quantized_rows(self, layer, codes, scales, out_dtype):
        return self._product(layer, codes, scales, out_dtype)

    def _product(self, layer, codes, scales, out_dtype):
        exact = codes.double() @ layer.qweight.double().T
        return (exact * scales.double() * layer.scales.double()).to(out_dtype)


class DropsRowScales(W8A8):
    """apply() right, the fused producer's entry point wrong."""

    def apply_quantized_rows(self, layer, codes, scales, out_dtype):
        return self._product(layer, codes, torch.ones_like(scales), out_dtype)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_unquantized_method_conforms(dtype, rtol) -> None:
    check_quantization_method(UnquantizedLinearMethod, dtype=dtype, rtol=rtol)


def test_a_real_int8_method_conforms() -> None:
    check_quantization_method(RowInt8, {}, shapes=[(32, [16]), (32, [8, 24])], max_weight_rel_error=0.02)


def test_row_quantization_statement_is_checked_against_apply() -> None:
    """A method stating its input row quantization conforms when apply_quantized_rows on rows quantized as stated
    is apply(x); one whose apply_quantized_rows drops the row scales is named."""
    check_quantization_method(W8A8, {}, shapes=[(32, [16])], rtol=0.02, max_weight_rel_error=0.02)
    with pytest.raises(AssertionError, match=r"apply_quantized_rows on rows quantized as stated .* is not apply\(x\)"):
        check_quantization_method(DropsRowScales, {}, shapes=[(32, [16])], rtol=0.02, max_weight_rel_error=0.02)


def test_row_quantization_rounds_half_away_from_zero_and_floors_the_scale() -> None:
    spec = RowQuantization(torch.int8, 127.0, 1e-3)
    codes, scales = spec.quantize(torch.tensor([[127.0, 0.5, -0.5, -63.5], [0.0, 0.0, 0.0, 0.0]]))
    assert codes.dtype == torch.int8 and codes.tolist() == [[127, 1, -1, -64], [0, 0, 0, 0]]
    assert scales.dtype == torch.float32 and scales.flatten().tolist() == pytest.approx([1.0, 1e-3])


def test_wrong_apply_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"apply\(x\) differs from x @ dequantize\(\)\.T"):
        check_quantization_method(ForgetsScales)


def test_misplaced_shards_are_caught() -> None:
    with pytest.raises(AssertionError, match=r"out=\[64, 32, 32\].*shards swapped or transposed"):
        check_quantization_method(IgnoresShard)


def test_missing_quantize_for_test_gives_advice() -> None:
    with pytest.raises(AssertionError, match=r"NoTestQuantizer does not implement quantize_for_test\(weight\)"):
        check_quantization_method(NoTestQuantizer)


# -- platforms -----------------------------------------------------------------------


class GoodPlatform(Platform):
    name = "good"
    device_type = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total=8 << 30, free=4 << 30)

    def create_model_runner(self, config, model_config):  # pragma: no cover - not exercised
        raise NotImplementedError


def test_a_correct_platform_conforms() -> None:
    assert check_platform(GoodPlatform) is True


def test_platform_problems_are_all_listed() -> None:
    class Bad(GoodPlatform):
        name = "Bad Name"
        attention_backends = ()
        default_block_size = 24

        def memory_info(self) -> MemoryInfo:
            return MemoryInfo(total=1, free=2)

    with pytest.raises(AssertionError) as info:
        check_platform(Bad)
    text = str(info.value)
    assert "name must be a non-empty lower-case string" in text
    assert "attention_backends must be a non-empty tuple" in text
    assert "default_block_size must be a positive power of two, got 24" in text


def test_platform_runtime_problems() -> None:
    class Overrides(GoodPlatform):
        def memory_info(self) -> MemoryInfo:
            return MemoryInfo(total=1, free=2)

        def engine_defaults(self, config: EngineConfig, model_config: ModelConfig) -> dict[str, Any]:
            return {**super().engine_defaults(config, model_config), "max_num_seqs": 0, "max_batch": 8}

        def configure(self, config: ResolvedConfig, model_config: ModelConfig) -> list[str]:
            return "ok"  # type: ignore[return-value]

    with pytest.raises(AssertionError) as info:
        check_platform(Overrides)
    text = str(info.value)
    assert "0 <= free <= total" in text
    assert "engine_defaults() must give max_num_seqs a positive int, got 0" in text
    assert "engine_defaults() names options EngineConfig does not have: ['max_batch']" in text
    assert "configure() must return a list of note strings, got 'ok'" in text


def test_availability_contract() -> None:
    class Raises(GoodPlatform):
        @classmethod
        def is_available(cls) -> bool:
            raise RuntimeError("no driver")

    class Silent(GoodPlatform):
        @classmethod
        def is_available(cls) -> bool:
            return False

    class Explained(Silent):
        @classmethod
        def unavailable_reason(cls) -> str | None:
            return "no good device"

    with pytest.raises(AssertionError, match="must never raise; it raised RuntimeError: no driver"):
        check_platform(Raises)
    with pytest.raises(AssertionError, match=r"unavailable_reason\(\) must explain"):
        check_platform(Silent)
    assert check_platform(Explained) is False
