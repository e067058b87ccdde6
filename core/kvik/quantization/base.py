"""The interface quantization-format plugins implement.

Quantization is a property of linear layers: a :class:`kvik.layers.linear.Linear`
asks its method to create its parameters, load checkpoint values into them,
post-process them, and run the matmul.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class RowQuantization:
    """The per-row activation quantization a W8A8-style ``apply`` starts with, stated exactly so that a fused
    producer kernel can emit the same codes (:meth:`QuantizationMethod.input_row_quantization`).

    For each row ``x`` (the producer's output values, as rounded to its dtype): ``scale = max(amax(|x|) / qmax,
    min_scale)`` in float32, ``codes = clamp(x / scale, -qmax, qmax)`` converted to ``dtype``, rounding half
    away from zero first for an integer ``dtype`` (a float8 conversion rounds itself)."""

    dtype: torch.dtype
    qmax: float
    min_scale: float

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The statement in torch, on any device: ``x`` ``[M, K]`` -> (codes ``[M, K]``, float32 scales ``[M, 1]``).
        The reference a fused producer's kernel is checked against."""
        values = x.float()
        scales = (values.abs().amax(dim=-1, keepdim=True) / self.qmax).clamp_min(self.min_scale)
        codes = (values / scales).clamp(-self.qmax, self.qmax)
        if not self.dtype.is_floating_point:
            codes = torch.where(codes >= 0, torch.floor(codes + 0.5), torch.ceil(codes - 0.5))
        return codes.to(self.dtype), scales


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

    def input_row_quantization(self, layer: Linear, num_rows: int) -> RowQuantization | None:
        """The quantization ``apply`` would run first on an input of ``num_rows`` rows, or None (the default:
        the method takes its input as it is, or no producer may do that step for it at this size).

        Where it is not None, a producer that already holds the layer's input (a fused activation kernel, such
        as the CUDA platform's SiLU-and-mul) may quantize it as stated and call :meth:`apply_quantized_rows`
        instead of ``apply``: the input then makes one pass through memory, not three."""
        return None

    def apply_quantized_rows(
        self, layer: Linear, codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``apply`` after its quantization step: ``codes`` ``[M, input_size]`` and float32 ``scales`` ``[M, 1]`` as
        :meth:`input_row_quantization` stated for ``M`` rows; returns ``[M, output_size]`` in ``out_dtype``."""
        raise NotImplementedError(f"{type(self).__name__} states no input row quantization")

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
