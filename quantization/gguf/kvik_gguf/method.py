"""Linear layers whose weights stay in llama.cpp blocks and are decoded per matmul."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from kvik.quantization.base import QuantizationMethod

from kvik_gguf import int4pack
from kvik_gguf.dequant import check_supported, dequantize, row_bytes, type_name
from kvik_gguf.weight import GGUFWeight

if TYPE_CHECKING:
    from kvik.layers.linear import Linear
    from kvik.quantization.base import PackedMatmul

_F32 = 0
# Set KVIK_GGUF_INT4_KERNEL=0 to keep every layer on the dequantize-per-call path (for comparisons).
_KERNEL_ENV = "KVIK_GGUF_INT4_KERNEL"


def _kernel_switched_off() -> bool:
    return os.environ.get(_KERNEL_ENV, "1") == "0"


class GGUFLinearMethod(QuantizationMethod):
    """Keeps each shard's raw blocks; ``apply`` decodes them to the activation dtype and multiplies.

    Shards of a merged layer (q/k/v, gate/up) may use different ggml types
    (llama.cpp's mixes put k/v at higher precision), so storage is per shard:
    buffer ``gguf_shard{i}`` = ``[output_sizes[i], bytes_per_row]`` uint8, with
    its type in ``layer.gguf_types[i]``; after loading, neighbouring shards of
    one type are fused into ``gguf_group{j}`` buffers (``layer.gguf_groups``
    holds their rows and types).

    On CPU, the first bfloat16 ``apply`` repacks every group whose type has an exact
    32-wide grouping (Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q8_0, see
    :mod:`kvik_gguf.int4pack`) into torch's int4 kernel layout, dropping the
    raw blocks: from then on those groups are multiplied packed, without
    decoding. The repack is lazy because the runner may instead dequantize
    the whole model (``quantized_weights='dequantize'``), which reads the raw
    blocks. Only bfloat16 activations take the kernel: torch 2.13's float32
    variant of it is an unvectorised reference (10x slower than decoding),
    so float32 stays on the exact decode path. Other groups (Q6_K, Q2_K, Q3_K,
    float rows) are decoded per call; nothing decoded is cached.
    """

    name = "gguf"

    def __init__(self, test_type: str = "Q8_0") -> None:
        self.test_type = test_type  # only used by quantize_for_test

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFLinearMethod:
        # The format's config only describes the file; each weight carries its own type.
        return cls(test_type=str(config.get("test_type", "Q8_0")))

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        """``{"weight": GGUFWeight}`` for a dense ``[rows, cols]`` weight, quantized by gguf-py (conformance suite)."""
        import gguf

        qtype = gguf.GGMLQuantizationType[self.test_type]
        packed = gguf.quants.quantize(weight.float().numpy(), qtype)
        data = torch.from_numpy(packed.view("uint8").reshape(weight.shape[0], -1).copy())
        return {"weight": GGUFWeight(data, int(qtype), (int(weight.shape[0]), int(weight.shape[1])))}

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        layer.gguf_types = [None] * len(layer.output_sizes)
        for i in range(len(layer.output_sizes)):
            # Placeholder until load_weight knows the shard's type (and so its byte width).
            layer.register_buffer(f"gguf_shard{i}", torch.empty(0, dtype=torch.uint8, device=device))

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if name != "weight":
            raise ValueError(f"unexpected parameter {name!r} for a GGUF linear layer (only 'weight' and 'bias')")
        index = 0 if shard is None else shard
        rows = layer.output_sizes[index]
        shape: tuple[int, ...]
        if isinstance(value, GGUFWeight):
            check_supported(value.ggml_type, f"shard {index} of {layer.extra_repr()}")
            data, ggml_type, shape = value.data, value.ggml_type, value.shape
        elif isinstance(value, torch.Tensor):
            # A dense checkpoint value (e.g. an F32 tensor in the file): keep it as F32 rows.
            data, ggml_type, shape = value.to(torch.float32).contiguous().view(torch.uint8), _F32, tuple(value.shape)
        else:
            raise TypeError(f"expected a GGUFWeight or a tensor for a GGUF linear layer, got {type(value).__name__}")
        if tuple(shape) != (rows, layer.input_size):
            raise ValueError(f"weight shape {tuple(shape)} does not match expected {(rows, layer.input_size)}")
        if tuple(data.shape) != (rows, row_bytes(ggml_type, layer.input_size)):
            raise ValueError(f"{type_name(ggml_type)} data shape {tuple(data.shape)} does not fit rows of {shape}")
        device = getattr(layer, f"gguf_shard{index}").device
        setattr(layer, f"gguf_shard{index}", data.to(device))
        layer.gguf_types[index] = ggml_type

    def process_weights_after_loading(self, layer: Linear) -> None:
        missing = [i for i, t in enumerate(layer.gguf_types) if t is None]
        if missing:
            raise ValueError(f"GGUF linear layer ({layer.extra_repr()}) got no weight for shard(s) {missing}")
        # Fuse neighbouring shards of one type into one buffer (rows are independent), so
        # apply() decodes a merged q/k/v or gate/up in one call instead of concatenating.
        groups: list[tuple[int, int, list[torch.Tensor]]] = []  # (rows, ggml type, raw shards)
        for i, rows in enumerate(layer.output_sizes):
            raw = getattr(layer, f"gguf_shard{i}")
            delattr(layer, f"gguf_shard{i}")
            if groups and groups[-1][1] == layer.gguf_types[i]:
                groups[-1] = (groups[-1][0] + rows, groups[-1][1], [*groups[-1][2], raw])
            else:
                groups.append((rows, layer.gguf_types[i], [raw]))
        layer.gguf_groups = [(rows, ggml_type) for rows, ggml_type, _ in groups]
        layer.gguf_planes = [0] * len(groups)  # int4 planes per group once repacked; 0 = raw blocks
        layer.gguf_repacked = False
        layer.gguf_packed = [None] * len(groups)  # Int4Packed per repacked group (same tensors as the buffers)
        for j, (_, _, raws) in enumerate(groups):
            layer.register_buffer(f"gguf_group{j}", raws[0] if len(raws) == 1 else torch.cat(raws, dim=0))

    def _repack(self, layer: Linear, dtype: torch.dtype) -> None:
        """Move every packable group to the int4 kernel's layout (once, on the first CPU call)."""
        layer.gguf_repacked = True
        if _kernel_switched_off():
            return
        for j, (rows, ggml_type) in enumerate(layer.gguf_groups):
            if not int4pack.packable(ggml_type, layer.input_size):
                continue
            packed = int4pack.repack(getattr(layer, f"gguf_group{j}"), ggml_type, rows, layer.input_size, dtype)
            delattr(layer, f"gguf_group{j}")
            layer.register_buffer(f"gguf_int4_{j}", packed.weight)
            layer.register_buffer(f"gguf_scales_zeros{j}", packed.scales_zeros)
            layer.gguf_planes[j] = packed.planes
            # Kept as the kernel's argument too: apply() runs ~120 times a token at batch 1 on a
            # small model, where rebuilding it from the buffers each call was measurable.
            layer.gguf_packed[j] = packed

    def pack_lm_head(self, value: Any, dtype: torch.dtype, device: torch.device) -> PackedMatmul | None:
        """A tied head's rows (the token embedding's blocks) through the int4 kernel, as the linears on the
        CPU in bfloat16: SmolLM2's Q8_0 [49152 x 576] head reads 35 MB packed instead of 57 MB dense (the
        largest single read of its decode step). Elsewhere None: the dense head stays."""
        if not isinstance(value, GGUFWeight) or device.type != "cpu" or dtype not in int4pack.FAST_DTYPES:
            return None
        rows, cols = value.shape
        if _kernel_switched_off() or not int4pack.packable(value.ggml_type, cols):
            return None
        # Rows in whole 64-row tiles of a layout we can read also serve the embedding's lookups (PackedRows).
        lookups = rows % 64 == 0 and int4pack.layout_understood()
        packed = int4pack.repack(value.data, value.ggml_type, rows, cols, dtype, lookups=lookups)
        return int4pack.PackedHead(packed, dtype) if lookups else packed.matmul

    def _packed(self, layer: Linear, j: int) -> int4pack.Int4Packed:
        return int4pack.Int4Packed(
            getattr(layer, f"gguf_int4_{j}"), getattr(layer, f"gguf_scales_zeros{j}"), layer.gguf_planes[j]
        )

    def _group_dense(self, layer: Linear, j: int, dtype: torch.dtype) -> torch.Tensor:
        rows, ggml_type = layer.gguf_groups[j]
        if layer.gguf_planes[j]:
            # Already repacked: the kernel applied to the identity gives W^T exactly for one
            # plane (each output is one product with 1.0); two planes add one rounding.
            eye = torch.eye(layer.input_size, dtype=self._packed(layer, j).scales_zeros.dtype)
            return self._packed(layer, j).matmul(eye).t().to(dtype)
        return dequantize(getattr(layer, f"gguf_group{j}"), ggml_type, (rows, layer.input_size), dtype)

    def _dense(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        groups = getattr(layer, "gguf_groups", None)
        assert groups is not None, "process_weights_after_loading runs before the layer is used"
        parts = [self._group_dense(layer, j, dtype) for j in range(len(groups))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        # torch's int4 CPU kernel: ~3x faster than a dense bf16 matmul per layer, at one thread or two
        # (docs/quantization.md; an earlier "pathological at two threads" was other jobs on the cores).
        if (
            not layer.gguf_repacked
            and x.device.type == "cpu"
            and x.dtype in int4pack.FAST_DTYPES
        ):
            self._repack(layer, x.dtype)
        parts = []
        for j, (rows, ggml_type) in enumerate(layer.gguf_groups):
            packed = layer.gguf_packed[j]
            if packed is not None:
                if packed.scales_zeros.dtype != x.dtype:  # the kernel wants scales in x's dtype
                    packed = int4pack.Int4Packed(packed.weight, packed.scales_zeros.to(x.dtype), packed.planes)
                parts.append(packed.matmul(x))
            else:  # decode to x's dtype: [rows, in], freed after the matmul
                raw = getattr(layer, f"gguf_group{j}")
                parts.append(F.linear(x, dequantize(raw, ggml_type, (rows, layer.input_size), x.dtype)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self._dense(layer, torch.float32)
