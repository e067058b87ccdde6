"""compressed-tensors checkpoints (llm-compressor's output): ``"quant_method": "compressed-tensors"``.

The ``quantization_config`` is read with the ``compressed-tensors`` package's own
config classes; its one scheme then maps onto a kvik-quant layer method:

* ``float-quantized`` FP8 (``FP8``, ``FP8_DYNAMIC``, ``FP8_BLOCK`` presets) -> :class:`kvik_quant.fp8.Fp8LinearMethod`;
* ``pack-quantized`` INT4 weight-only (``W4A16``, ``W4A16_ASYM``) -> :class:`CompressedTensorsInt4Method`;
* ``int-quantized`` INT8 W8A8 (``INT8_W8A8``, ``W8A8``) -> :class:`kvik_quant.int8.Int8LinearMethod`.

A ``kv_cache_scheme`` of FP8 (8-bit float, per-tensor or per-head static scales) is
accepted: its ``self_attn.k_scale`` / ``v_scale`` tensors load into each layer's
attention backend (:mod:`kvik.models.kv_scales`) and are used with ``kv_cache_dtype="fp8"``.

Other schemes (NVFP4, MXFP4, 2:4 sparsity, several schemes in one checkpoint, an
INT8 KV cache) are refused at start-up with the scheme named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from kvik.quantization.base import QuantizationMethod, RowQuantization

from kvik_quant import int4_pack as pack
from kvik_quant.fp8 import Fp8LinearMethod
from kvik_quant.int4 import Int4LinearMethod, check_bits_and_group, rtn_quantize
from kvik_quant.int8 import Int8LinearMethod

if TYPE_CHECKING:
    from kvik.layers.linear import Linear

SUPPORTED = (
    "FP8 float-quantized (tensor, channel or 128x128-block weights; dynamic per-token, static per-tensor or "
    "per-token-group activations), INT4 pack-quantized weight-only (group 32/64/128 or per channel, "
    "symmetric or with zero points) and INT8 int-quantized W8A8 (symmetric tensor or channel weights; "
    "dynamic per-token or static per-tensor symmetric activations)"
)


class CompressedTensorsInt4Method(Int4LinearMethod):
    """``pack-quantized`` 4-bit weights: ``weight_packed`` ``[N, K/8]``, ``weight_scale``, ``weight_zero_point``."""

    name = "compressed-tensors"

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if name == "weight_packed":  # packed along K, codes offset by +8
            codes = pack.unpack_last(value.to(torch.int32))  # [N_s, K] unsigned
            self.store(layer, "qweight", pack.pack_rows(codes.t()), shard)
        elif name == "weight_scale":  # [N_s, K/G]
            self.store(layer, "scales", value.t().to(layer.scales.dtype), shard)
        elif name == "weight_zero_point":  # [N_s/8, K/G] packed along N; signed zero + 8 == our zero
            self.store(layer, "zeros", pack.unpack_rows(value.to(torch.int32)).t().to(layer.zeros.dtype), shard)
        elif name == "weight_g_idx":
            self.store_g_idx(layer, value, shard)
        elif name == "weight_shape":
            rows = layer.output_sizes[shard] if shard is not None else layer.output_size
            if [int(v) for v in value.tolist()] != [rows, layer.input_size]:
                raise ValueError(
                    f"weight_shape {value.tolist()} does not match the layer's [{rows}, {layer.input_size}]"
                )
        else:
            raise ValueError(f"compressed-tensors (pack-quantized): unexpected parameter {name!r}")

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        symmetric = self.symmetric
        codes, scales, zeros = rtn_quantize(weight, self.group_size, symmetric=symmetric)
        values = {
            "weight_packed": pack.pack_last(codes),
            "weight_scale": scales.to(torch.bfloat16),
            "weight_shape": torch.tensor(list(weight.shape)),
        }
        if not symmetric:
            values["weight_zero_point"] = pack.pack_rows(zeros)
        return values

    symmetric = True  # only quantize_for_test reads it


def method_for_scheme(config: dict[str, Any]) -> QuantizationMethod:
    """The kvik-quant method for a compressed-tensors ``quantization_config``; ValueError naming what is unsupported."""
    from compressed_tensors.quantization import QuantizationConfig

    try:
        qc = QuantizationConfig.model_validate(config)
    except Exception as exc:
        raise ValueError(f"compressed-tensors: the quantization_config is not valid: {exc}") from exc
    if len(qc.config_groups) != 1:
        raise ValueError(
            f"compressed-tensors: {len(qc.config_groups)} quantization schemes in one checkpoint "
            f"({', '.join(qc.config_groups)}); kvik-quant applies one scheme to every linear layer"
        )
    scheme = next(iter(qc.config_groups.values()))
    kv = qc.kv_cache_scheme
    if kv is not None and not (kv.type == "float" and kv.num_bits == 8 and str(kv.strategy) in ("tensor", "head")):
        raise ValueError(
            f"compressed-tensors: a {kv.type}{kv.num_bits} {kv.strategy} KV cache (kv_cache_scheme) is not supported; "
            "kvik reads FP8 KV-cache scales (float8, per tensor or per head), used with kv_cache_dtype='fp8'"
        )
    for extra, what in ((config.get("sparsity_config"), "sparsity (sparsity_config)"),
                        (config.get("transform_config"), "transforms (transform_config)")):  # fmt: skip
        if extra:
            raise ValueError(f"compressed-tensors: {what} is not supported by kvik-quant; supported: {SUPPORTED}")
    fmt = str(scheme.format or qc.format)
    w, a = scheme.weights, scheme.input_activations
    described = (
        f"format {fmt}, weights {w.type if w else None}{w.num_bits if w else ''} "
        f"{w.strategy if w else ''}, activations "
        f"{f'{a.type}{a.num_bits} {a.strategy} dynamic={a.dynamic}' if a else 'none'}"
    )
    refusal = ValueError(
        f"compressed-tensors scheme ({described}) is not supported by kvik-quant; supported: {SUPPORTED}"
    )
    if w is None:
        raise refusal
    if w.type == "float" and w.num_bits == 8 and fmt in ("float-quantized", "naive-quantized"):
        if a is None or a.type != "float" or a.num_bits != 8:
            raise refusal
        if w.strategy == "block":
            block = tuple(w.block_structure or ())
            if len(block) != 2 or not (a.dynamic and a.strategy == "group" and a.group_size == block[1]):
                raise refusal
            return Fp8LinearMethod(serialized=True, block=(int(block[0]), int(block[1])))
        if w.strategy not in ("tensor", "channel"):
            raise refusal
        if a.dynamic and a.strategy == "token":
            return Fp8LinearMethod(serialized=True)
        if not a.dynamic and a.strategy == "tensor":
            return Fp8LinearMethod(serialized=True, static_activations=True)
        raise refusal
    if w.type == "int" and w.num_bits == 8 and fmt in ("int-quantized", "naive-quantized") and a is not None:
        if a.type != "int" or a.num_bits != 8 or not a.symmetric or not w.symmetric:
            raise refusal
        if w.strategy not in ("tensor", "channel"):
            raise refusal
        if a.dynamic and a.strategy == "token":
            return Int8LinearMethod(serialized=True)
        if not a.dynamic and a.strategy == "tensor":
            return Int8LinearMethod(serialized=True, static_activations=True)
        raise refusal
    if w.type == "int" and fmt == "pack-quantized" and a is None:
        if w.strategy == "channel":
            group = check_bits_and_group("compressed-tensors", w.num_bits, -1)
        elif w.strategy == "group":
            group = check_bits_and_group("compressed-tensors", w.num_bits, w.group_size)
        else:
            raise refusal
        method = CompressedTensorsInt4Method(group)
        method.symmetric = bool(w.symmetric)
        return method
    raise refusal


class CompressedTensorsMethod(QuantizationMethod):
    """Delegates every call to the method :func:`method_for_scheme` picks for the checkpoint's scheme."""

    name = "compressed-tensors"
    devices: ClassVar[tuple[str, ...]] = ("cuda",)
    device_requirements: ClassVar[str] = "FP8: compute capability >= 8.9; INT4: Triton; INT8: torch._int_mm"

    def __init__(self, inner: QuantizationMethod) -> None:
        self.inner = inner
        self.supported_act_dtypes = inner.supported_act_dtypes  # type: ignore[misc]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsMethod:
        return cls(method_for_scheme(config))

    def validate_device(self, device: torch.device) -> list[str]:
        return self.inner.validate_device(device)

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        self.inner.create_weights(layer, dtype, device)

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        self.inner.load_weight(layer, name, value, shard)

    def process_weights_after_loading(self, layer: Linear) -> None:
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return self.inner.apply(layer, x)

    def input_row_quantization(self, layer: Linear, num_rows: int) -> RowQuantization | None:
        return self.inner.input_row_quantization(layer, num_rows)

    def apply_quantized_rows(
        self, layer: Linear, codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return self.inner.apply_quantized_rows(layer, codes, scales, out_dtype)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self.inner.dequantize(layer)

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        return self.inner.quantize_for_test(weight)

    def weight_bytes(self, layer: Linear) -> int:
        return self.inner.weight_bytes(layer)
