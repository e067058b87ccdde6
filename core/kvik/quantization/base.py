"""The interface quantization-format plugins implement.

Quantization is a property of linear layers: a :class:`kvik.layers.linear.Linear`
asks its method to create its parameters, load checkpoint values into them,
post-process them, and run the matmul.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from kvik.layers.linear import Linear

PackedMatmul = Callable[[torch.Tensor], torch.Tensor]  # x [n, in] -> x @ W.T [n, out], from a packed W


@runtime_checkable
class PackedRows(Protocol):
    """A packed tied head that also decodes its own rows. The token embedding then looks up from it and
    keeps no dense copy of its own (:meth:`QuantizationMethod.pack_lm_head` may return one).

    ``rows(ids)`` must give exactly the values the dense embedding would hold (the checkpoint's rows
    decoded in the model's dtype), for ``ids`` of any shape: ``[*ids.shape, hidden]``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor: ...


class QuantizationMethod(ABC):
    """One quantization format, configured for one checkpoint."""

    name: ClassVar[str]
    # Compute dtypes the method's apply() accepts for activations.
    supported_act_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    # torch device types whose kernels run the weights packed (``kvik plugins`` lists them; platforms
    # that have kernels keep such weights packed by default). Empty: no device-specific kernels.
    devices: ClassVar[tuple[str, ...]] = ()
    device_requirements: ClassVar[str] = ""  # e.g. "compute capability >= 8.9", shown by ``kvik plugins``
    # True for a method that quantizes a dense checkpoint while loading it (``quantization="fp8"``):
    # create_weights makes a dense weight and process_weights_after_loading quantizes it.
    quantizes_dense_checkpoints: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationMethod:
        """Build from a checkpoint's ``quantization_config``; ValueError if invalid."""
        return cls()

    def validate_device(self, device: torch.device) -> list[str]:
        """Why this method cannot run its weights packed on ``device`` (empty: it can).

        Called at start-up, before any weight is read, when weights stay packed
        (``quantized_weights='quantized'``). Each reason should name the method,
        the device and what would work instead.
        """
        return []

    @abstractmethod
    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        """Register on ``layer`` the parameters/buffers that hold its weight.

        ``layer.input_size`` and ``layer.output_sizes`` (one entry per merged
        shard, e.g. q/k/v) give the logical shape ``[sum(output_sizes), input_size]``.
        """

    @abstractmethod
    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        """Store one checkpoint value.

        ``name`` is the parameter's last name component (``"weight"``, or a
        format's own such as ``"weight_scale"``); ``shard`` is the index into
        ``layer.output_sizes`` for merged layers, else None. ``value`` is a
        tensor, or whatever the checkpoint format yields for this method.
        """

    def process_weights_after_loading(self, layer: Linear) -> None:  # noqa: B027 - optional, no-op by default
        """Repack or transpose loaded weights for fast ``apply`` (optional)."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` (without bias): ``x`` is ``[..., input_size]``."""

    def apply_with_bias(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``apply(layer, x) + bias``; override to fuse the add (one rounding in 16-bit dtypes)."""
        return self.apply(layer, x) + bias

    @abstractmethod
    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The dense weight ``[sum(output_sizes), input_size]`` that ``apply`` multiplies by.

        Used by the conformance suite and by formats that fall back to dense.
        """

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        """Quantize a dense ``[out, in]`` float weight into this format's checkpoint values.

        Optional: only the conformance suite calls it
        (:func:`kvik.testing.conformance.quantization.check_quantization_method`).
        Return ``{parameter_name: value}`` exactly as the checkpoint loader would
        pass them to :meth:`load_weight` for one shard (e.g. ``{"qweight": ...,
        "scales": ...}``), so the check exercises the method's real loading path.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement quantize_for_test(weight), so the conformance suite "
            "cannot build test weights for it; implement it to return {name: value} as your checkpoint "
            "format stores one [out, in] weight (the same values load_weight receives)"
        )

    def pack_lm_head(self, value: Any, dtype: torch.dtype, device: torch.device) -> PackedMatmul | None:
        """Optional: a packed multiply for a tied LM head whose checkpoint tensor is quantized.

        ``value`` is what the format yields for ``lm_head.weight`` under this method (the embedding's
        quantized rows). Return ``hidden [n, H] -> logits [n, V]`` in ``dtype`` computed from the packed
        weight, or None to keep the dense head (the default; e.g. a device or dtype without a fast
        kernel). A :class:`PackedRows` also serves the embedding's lookups, so the dense embedding is
        never held (a format yields the tied head before the embedding for that)."""
        return None

    def weight_bytes(self, layer: Linear) -> int:
        """Bytes the layer's weight storage occupies."""
        return sum(t.numel() * t.element_size() for t in layer.parameters(recurse=False)) + sum(
            t.numel() * t.element_size() for t in layer.buffers(recurse=False)
        )
