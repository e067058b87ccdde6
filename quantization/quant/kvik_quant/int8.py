"""INT8 W8A8 linear layers: int8 weights with per-output-channel scales, activations quantized per token.

For GPUs without FP8 tensor cores (A100, ...). Two ways in:

* online: ``quantization="int8"`` on a bf16/fp16 checkpoint (symmetric, one scale per output channel);
* compressed-tensors ``int-quantized`` checkpoints (llm-compressor's ``W8A8`` / ``INT8_W8A8``:
  channel or tensor weights; dynamic per-token or static per-tensor activations).

On CUDA (:func:`plan`): decode-sized calls run the W8A16 GEMV of :mod:`kvik_quant.w8_kernels`
(bf16 activations, int8 weights converted in registers: one launch, no activation quantization);
larger ones quantize the activations per token (one Triton kernel) and run the Triton int8
GEMM with int32 accumulation and the row x column rescale fused into its store. Elsewhere
the torch reference multiplies the dequantized operands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from kvik.quantization.base import QuantizationMethod, RowQuantization
from kvik.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from kvik.layers.linear import Linear

INT8_MAX = 127.0
# Dynamic per-token activation quantization (every path's, and what fused producers are told to do).
ROW_QUANTIZATION = RowQuantization(torch.int8, INT8_MAX, 1e-10)
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows: smaller batches are padded


def quantize_rows(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` -> (int8 ``[M, K]``, float32 ``[M, 1]`` scales); symmetric, one scale per row unless given."""
    if scale is None:
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / INT8_MAX).clamp_min(ROW_QUANTIZATION.min_scale)
    q = torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_mm(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``[M, K] x [N, K]^T`` with int32 accumulation (``torch._int_mm``, CUDA) and float32 rescaling."""
    m = xq.shape[0]
    if m < _INT_MM_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, _INT_MM_MIN_ROWS - m))
    acc = torch._int_mm(xq, wq.t())[:m]  # [M, N] int32
    return (acc.float() * x_scale * w_scale.view(1, -1)).to(dtype)


def reference_mm(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Dequantize both operands to ``dtype`` and multiply: what :func:`int8_mm` computes, on any device."""
    return F.linear((xq.float() * x_scale).to(dtype), (wq.float() * w_scale[:, None]).to(dtype))


# Which CUDA path runs M rows (benchmarks/quant_kernels_sweep.py measures them all on the H200):
# "w8a16" (Triton GEMV on bf16 activations, no activation quantization) for decode sizes with dynamic
# scales; "triton" (int8 tl.dot with the rescale fused into the store) otherwise. "int_mm"
# (torch._int_mm plus torch's rescale, the old path) stays for the sweep's comparison.
W8A16_MAX_ROWS = 16


def plan(m: int, static: bool) -> str:
    return "w8a16" if m <= W8A16_MAX_ROWS and not static else "triton"


class Int8LinearMethod(QuantizationMethod):
    name = "int8"
    devices: ClassVar[tuple[str, ...]] = ("cuda",)
    device_requirements: ClassVar[str] = "torch._int_mm; other devices run the torch reference"
    quantizes_dense_checkpoints = True

    def __init__(self, serialized: bool = False, static_activations: bool = False) -> None:
        self.serialized = serialized
        self.static_activations = static_activations

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Int8LinearMethod:
        if config:
            raise ValueError("int8: checkpoints load through their own format (compressed-tensors int-quantized)")
        return cls()

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        if not self.serialized:
            UnquantizedLinearMethod().create_weights(layer, dtype, device)
            return
        rows = layer.output_size
        layer.weight = _param(torch.zeros(rows, layer.input_size, dtype=torch.int8, device=device))
        layer.weight_scale = _param(torch.ones(rows, dtype=torch.float32, device=device))
        if self.static_activations:
            layer.input_scale = _param(torch.zeros(len(layer.output_sizes), device=device))

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if not self.serialized:
            UnquantizedLinearMethod().load_weight(layer, name, value, shard)
            return
        rows = layer.shard_rows(shard)
        start, size = rows.start, rows.stop - rows.start
        if name == "weight":
            target = layer.weight.data[start : start + size]
            if tuple(value.shape) != tuple(target.shape) or value.dtype != torch.int8:
                raise ValueError(f"int8 weight {value.dtype} {tuple(value.shape)}, expected int8 {tuple(target.shape)}")
            target.copy_(value)
        elif name == "weight_scale":
            value = value.float()
            target = layer.weight_scale.data[start : start + size]
            target.copy_(value.reshape(-1).expand(size) if value.numel() == 1 else value.reshape(size))
        elif name == "input_scale" and self.static_activations:
            layer.input_scale.data[shard or 0] = value.float().reshape(())
        elif name == "weight_zero_point" and not bool(value.any()):
            return  # symmetric checkpoints may still store all-zero zero points
        else:
            raise ValueError(f"unexpected parameter {name!r} for an int8 layer (expected weight, weight_scale)")

    def process_weights_after_loading(self, layer: Linear) -> None:
        if not self.serialized:
            q, scale = quantize_rows(layer.weight.data)
            layer.weight = _param(q)
            layer.weight_scale = _param(scale.reshape(-1))
        if self.static_activations:
            layer.input_scale = _param(layer.input_scale.data.max())
        shape_ok = layer.input_size % 8 == 0 and layer.output_size % 8 == 0
        layer.int8_kernel = layer.weight.device.type == "cuda" and shape_ok and not getattr(torch.version, "hip", None)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.input_size)
        static = layer.input_scale.float().reshape(1, 1) if self.static_activations else None
        path = plan(x2.shape[0], static is not None) if layer.int8_kernel else "reference"
        if path == "w8a16":
            from kvik_quant import fallback, splitk
            from kvik_quant.w8_kernels import w8a16_gemv

            y = fallback.run(
                "int8 w8a16 gemv",
                lambda: w8a16_gemv(x2, layer.weight, layer.weight_scale, splitk.num_sms(x2.device)),
                lambda: self._w8a8(layer, x2, None, "triton", x.dtype),
            )
        else:
            y = self._w8a8(layer, x2, static, path, x.dtype)
        return y.reshape(*x.shape[:-1], layer.output_size)

    def input_row_quantization(self, layer: Linear, num_rows: int) -> RowQuantization | None:
        """Dynamic scales on the CUDA kernels' GEMM path: what :meth:`_w8a8` runs first."""
        if self.static_activations or not layer.int8_kernel or plan(num_rows, False) != "triton":
            return None
        return ROW_QUANTIZATION

    def apply_quantized_rows(
        self, layer: Linear, codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return self._gemm(layer, codes, scales, "triton" if layer.int8_kernel else "reference", out_dtype)

    def _w8a8(
        self, layer: Linear, x2: torch.Tensor, static: torch.Tensor | None, path: str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Per-token (or static) activation quantization, then the int8 GEMM of ``path`` or the reference."""
        if layer.int8_kernel and static is None:  # one Triton kernel instead of six torch ones
            from kvik_quant.act_quant_kernel import quantize_rows as quantize_rows_kernel

            q = ROW_QUANTIZATION
            xq, xs = quantize_rows_kernel(x2, q.dtype, q.qmax, q.min_scale)
        else:
            xq, xs = quantize_rows(x2, static)
        if xs.shape[0] != x2.shape[0]:
            xs = xs.expand(x2.shape[0], 1)
        return self._gemm(layer, xq, xs, path, dtype)

    def _gemm(self, layer: Linear, xq: torch.Tensor, xs: torch.Tensor, path: str, dtype: torch.dtype) -> torch.Tensor:
        """The int8 GEMM of ``path`` (``"triton"``, ``"int_mm"``, else the reference) on quantized rows."""
        if path == "triton":
            from kvik_quant import fallback
            from kvik_quant.w8_kernels import int8_gemm, int8_gemm_config

            cfg = int8_gemm_config(xq.shape[0], layer.weight.shape[0], layer.weight.shape[1])
            return fallback.run(
                "int8 gemm",
                lambda: int8_gemm(xq, xs, layer.weight, layer.weight_scale, dtype, cfg),
                lambda: int8_mm(xq, xs, layer.weight, layer.weight_scale, dtype),
            )
        mm = int8_mm if path == "int_mm" else reference_mm
        return mm(xq, xs, layer.weight, layer.weight_scale, dtype)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        if layer.weight.dtype != torch.int8:
            return layer.weight.data.float()
        return layer.weight.float() * layer.weight_scale[:, None]

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        if not self.serialized:
            return {"weight": weight}
        q, scale = quantize_rows(weight)
        values = {"weight": q, "weight_scale": scale}
        if self.static_activations:
            values["input_scale"] = torch.tensor([4.0 / INT8_MAX])
        return values


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)
