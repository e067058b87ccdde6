"""Int8 weight-only linear layers: ``W ≈ q * scale[:, None]`` with ``q`` int8 and one scale per output row."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from kvik.quantization.base import QuantizationMethod

if TYPE_CHECKING:
    from kvik.layers.linear import Linear


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (``[out, in]`` int8 in [-127, 127], ``[out]`` float32 scales)."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8LinearMethod(QuantizationMethod):
    """Checkpoint tensors per linear layer ``X``: ``X.weight`` (int8) and ``X.weight_scale`` (float, ``[out]``)."""

    name = "example_int8"

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        rows = sum(layer.output_sizes)
        # Parameters, not buffers, so .to(device) and weight_bytes() see them; never trained.
        layer.weight = torch.nn.Parameter(
            torch.zeros(rows, layer.input_size, dtype=torch.int8, device=device), requires_grad=False
        )
        # Scales stay float32 whatever the compute dtype: they are tiny and bf16 would cost accuracy.
        layer.weight_scale = torch.nn.Parameter(
            torch.ones(rows, dtype=torch.float32, device=device), requires_grad=False
        )

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if name not in ("weight", "weight_scale"):
            raise ValueError(f"unexpected parameter {name!r} for an example_int8 layer (expected weight, weight_scale)")
        if name == "weight" and value.dtype != torch.int8:
            raise ValueError(f"example_int8 weights must be int8, got {value.dtype}; convert with quantize_checkpoint")
        target = getattr(layer, name).data
        if shard is not None:  # merged layer: this shard's rows
            start = sum(layer.output_sizes[:shard])
            target = target[start : start + layer.output_sizes[shard]]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{name} shape {tuple(value.shape)} does not match expected {tuple(target.shape)}")
        target.copy_(value)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        # x @ (q * s).T == (x @ q.T) * s: scale the [.., out] output instead of the [out, in] weight.
        y = F.linear(x, layer.weight.to(x.dtype))
        return y * layer.weight_scale.to(x.dtype)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return layer.weight.float() * layer.weight_scale[:, None]

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        """Checkpoint values for a dense weight (used by kvik's conformance check)."""
        q, scale = quantize_int8(weight)
        return {"weight": q, "weight_scale": scale}
