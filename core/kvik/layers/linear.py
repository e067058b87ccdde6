"""A linear layer whose weight storage and matmul belong to a QuantizationMethod."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvik.distributed.sharding import materialize
from kvik.quantization.base import QuantizationMethod
from kvik.quantization.unquantized import UnquantizedLinearMethod


class Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` of shape ``[sum(output_sizes), input_size]``.

    Several projections may be merged into one layer (q/k/v, gate/up): each is
    a *shard* of ``output_sizes`` loaded separately from the checkpoint.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: int | list[int],
        bias: bool = False,
        quant_method: QuantizationMethod | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, dtype, torch.device(device))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(self.output_size, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.bias = None

    def shard_rows(self, shard: int | None) -> slice:
        """The output rows a checkpoint shard fills (``q``/``k``/``v`` or ``gate``/``up`` of a merged
        layer); ``None``: every row."""
        if shard is None:
            return slice(0, self.output_size)
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def load(self, name: str, value: Any, shard: int | None = None) -> None:
        """Load a checkpoint value (``"weight"``, ``"bias"``, or a quant method's own)."""
        value = materialize(value)  # a lazily read checkpoint tensor (kvik.distributed.sharding)
        if name == "bias":
            if self.bias is None:
                raise ValueError("checkpoint has a bias for a layer built without one")
            self.bias.data[self.shard_rows(shard)].copy_(value)
            return
        self.quant_method.load_weight(self, name, value, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return self.quant_method.apply_with_bias(self, x, self.bias)
        return self.quant_method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, method={self.quant_method.name}"
