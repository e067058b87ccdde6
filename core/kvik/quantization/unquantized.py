"""Dense weights in the compute dtype: the default linear method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from kvik.quantization.base import QuantizationMethod

if TYPE_CHECKING:
    from kvik.layers.linear import Linear


class UnquantizedLinearMethod(QuantizationMethod):
    name = "none"

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        weight = torch.empty(sum(layer.output_sizes), layer.input_size, dtype=dtype, device=device)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if name != "weight":
            raise ValueError(f"unexpected parameter {name!r} for an unquantized linear layer")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected a tensor for an unquantized weight, got {type(value).__name__}")
        target = _weight(layer).data[layer.shard_rows(shard)]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"weight shape {tuple(value.shape)} does not match expected {tuple(target.shape)}")
        target.copy_(value)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _weight(layer))

    def apply_with_bias(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # Fused like HF's nn.Linear, so bf16 results round once, as theirs do.
        return F.linear(x, _weight(layer), bias)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return _weight(layer).data

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        return {"weight": weight}


def _weight(layer: Linear) -> torch.Tensor:
    # nn.Module.__getattr__ is typed Tensor | Module; the weight is always a Parameter here.
    return cast(torch.Tensor, layer.weight)
