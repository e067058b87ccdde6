"""FP8 W8A8 linear layers: e4m3 weights with float32 scales, activations quantized to e4m3 per call.

Three ways in, one layout in memory (``weight`` ``[N, K]`` FP8 plus scales):

* online (``quantization="fp8"`` on a bf16/fp16 checkpoint): the dense weight is
  loaded, then quantized with one scale per output channel;
* Hugging Face ``"quant_method": "fp8"`` checkpoints: ``weight`` FP8 with a per-tensor
  ``weight_scale`` (AutoFP8 style) or block-wise ``weight_scale_inv``
  (``weight_block_size: [128, 128]``, DeepSeek/Qwen style), ``input_scale`` when
  ``activation_scheme`` is ``static``;
* compressed-tensors ``float-quantized`` checkpoints (llm-compressor's FP8 schemes),
  which :mod:`kvik_quant.compressed_tensors` maps onto this class.

Per-tensor scales of merged shards (q/k/v) become per-channel scales, so every
non-block layer runs one row-wise ``torch._scaled_mm`` on FP8 GPUs — except decode-sized
calls (``M <= W8A16_MAX_ROWS``) with dynamic activation scales, which run the Triton W8A16
GEMV (:func:`kvik_quant.w8_kernels.w8a16_gemv`: bf16 activations, e4m3 weights, no
activation quantization; slightly *more* accurate than W8A8). The torch
reference (:func:`kvik_quant.fp8_ops.reference_mm`) runs everywhere else.
Block-scaled layers always take the reference path (weights stay FP8 in memory;
each call dequantizes them), which is correct but not fast yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from kvik.quantization.base import QuantizationMethod, RowQuantization
from kvik.quantization.unquantized import UnquantizedLinearMethod

from kvik_quant import device as dev
from kvik_quant import fp8_ops as ops

if TYPE_CHECKING:
    from kvik.layers.linear import Linear

# Rows up to which a dynamic-activation layer runs the W8A16 GEMV (kvik_quant.w8_kernels): at decode
# sizes quantizing the activations costs a launch and buys nothing (the GEMV is bandwidth-bound).
# benchmarks/quant_kernels_sweep.py measures both paths per row count on the H200.
W8A16_MAX_ROWS = 16
# Dynamic per-token activation quantization on the kernels' path (and what fused producers are told to do).
ROW_QUANTIZATION = RowQuantization(ops.FP8, ops.FP8_MAX, ops.MIN_SCALE)


class Fp8LinearMethod(QuantizationMethod):
    name = "fp8"
    devices: ClassVar[tuple[str, ...]] = ("cuda",)
    device_requirements: ClassVar[str] = "NVIDIA compute capability >= 8.9"
    quantizes_dense_checkpoints = True

    def __init__(
        self,
        serialized: bool = False,
        static_activations: bool = False,
        block: tuple[int, int] | None = None,
    ) -> None:
        self.serialized = serialized  # False: quantize the dense checkpoint at load
        self.static_activations = static_activations  # calibrated input_scale per layer
        self.block = block  # (rows, cols) of one weight scale block; None: per-channel
        if block is not None and static_activations:
            raise ValueError("fp8: block-scaled weights take dynamic activation scales; static input_scale with "
                             "weight_block_size is not a known checkpoint layout")  # fmt: skip

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8LinearMethod:
        if not config:  # quantization="fp8" on a dense checkpoint
            return cls()
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 checkpoint: activation_scheme {scheme!r} is not supported (dynamic, static)")
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"fp8 checkpoint: fmt {fmt!r} is not supported (kvik-quant reads e4m3 weights)")
        block = config.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
                raise ValueError(f"fp8 checkpoint: weight_block_size must be [rows, cols], got {block!r}")
            block = (int(block[0]), int(block[1]))
        return cls(serialized=True, static_activations=scheme == "static", block=block)

    def validate_device(self, device: torch.device) -> list[str]:
        return dev.fp8_refusal(self.name, device, dequantize_works=self.serialized)

    # -- storage --------------------------------------------------------------------------------
    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        rows, cols = sum(layer.output_sizes), layer.input_size
        if not self.serialized:  # dense until process_weights_after_loading quantizes it
            UnquantizedLinearMethod().create_weights(layer, dtype, device)
            return
        layer.weight = _param(torch.zeros(rows, cols, dtype=ops.FP8, device=device))
        if self.block is None:
            layer.weight_scale = _param(torch.ones(rows, dtype=torch.float32, device=device))  # [N]
        else:
            bn, bk = self.block
            for size in layer.output_sizes[:-1]:
                if size % bn:
                    raise ValueError(f"fp8: merged shard of {size} rows is not a multiple of the {bn}-row scale block")
            layer.weight_scale = _param(torch.ones(-(-rows // bn), -(-cols // bk), device=device))
        if self.static_activations:  # one calibrated scale per shard; the layer uses their max
            layer.input_scale = _param(torch.zeros(len(layer.output_sizes), device=device))

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if not self.serialized:
            UnquantizedLinearMethod().load_weight(layer, name, value, shard)
            return
        rows = layer.shard_rows(shard)
        start, size = rows.start, rows.stop - rows.start
        if name == "weight":
            if value.dtype != ops.FP8:  # a layer the checkpoint left dense (modules_to_not_convert)
                if self.block is not None:
                    raise ValueError(f"fp8: a dense {value.dtype} weight in a block-scaled checkpoint")
                value, scale = ops.quantize_weight_per_channel(value)
                layer.weight_scale.data[start : start + size] = scale.to(layer.weight_scale.device)
            _copy_rows(layer.weight, value, start, size)
        elif name in ("weight_scale", "weight_scale_inv"):  # both multiply: w = q * scale
            value = value.float()
            if self.block is None:
                target = layer.weight_scale.data[start : start + size]
                target.copy_(value.reshape(-1).expand(size) if value.numel() == 1 else value.reshape(size))
            else:
                first = start // self.block[0]
                _copy_rows(layer.weight_scale, value, first, value.shape[0])
        elif name == "input_scale" and self.static_activations:
            layer.input_scale.data[shard or 0] = value.float().reshape(())
        else:
            raise ValueError(f"unexpected parameter {name!r} for an fp8 layer (expected weight, weight_scale)")

    def process_weights_after_loading(self, layer: Linear) -> None:
        if not self.serialized:
            weight, scale = ops.quantize_weight_per_channel(layer.weight.data)
            layer.weight = _param(weight)
            layer.weight_scale = _param(scale)
        if self.static_activations:
            layer.input_scale = _param(layer.input_scale.data.max())
        device = layer.weight.device
        layer.fp8_kernel = (  # the FP8 tensor-core GEMM, else the torch reference
            self.block is None
            and dev.fp8_supported(device)
            and ops.fp8_gemm_shape_ok(layer.output_size, layer.input_size)
        )
        if self.block is not None and layer.input_size % self.block[1]:
            raise ValueError(f"fp8: input size {layer.input_size} is not a multiple of the {self.block[1]}-wide block")

    # -- compute -------------------------------------------------------------------------------
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.input_size)  # [M, K]
        weight = layer.weight
        if self.block is not None:
            xq, xs = ops.quantize_per_token_group(x2, self.block[1])
            x_scale = xs.repeat_interleave(self.block[1], dim=1)
            w_scale = ops.expand_block_scales(layer.weight_scale, self.block, tuple(weight.shape))
            y = ops.reference_mm(xq, x_scale, weight, w_scale, x.dtype)
        elif layer.fp8_kernel and not self.static_activations and x2.shape[0] <= W8A16_MAX_ROWS:
            from kvik_quant import fallback, splitk
            from kvik_quant.w8_kernels import w8a16_gemv

            # Decode: one launch, no activation quantization.
            y = fallback.run(
                "fp8 w8a16 gemv",
                lambda: w8a16_gemv(x2, weight, layer.weight_scale, splitk.num_sms(x2.device)),
                lambda: self._w8a8(layer, x2, x.dtype),
            )
        else:
            y = self._w8a8(layer, x2, x.dtype)
        return y.reshape(*x.shape[:-1], layer.output_size)

    def input_row_quantization(self, layer: Linear, num_rows: int) -> RowQuantization | None:
        """Per-channel weights with dynamic scales on the kernels' GEMM path: what :meth:`_w8a8` runs first."""
        if self.block is not None or self.static_activations or not layer.fp8_kernel or num_rows <= W8A16_MAX_ROWS:
            return None
        return ROW_QUANTIZATION

    def apply_quantized_rows(
        self, layer: Linear, codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return self._gemm(layer, codes, scales, out_dtype)

    def _w8a8(self, layer: Linear, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-token (or static) activation quantization, then the FP8 GEMM or its reference."""
        if self.static_activations:
            xq, xs = ops.quantize_static(x2, layer.input_scale)
        elif layer.fp8_kernel:  # one Triton kernel instead of six torch ones
            from kvik_quant.act_quant_kernel import quantize_rows

            q = ROW_QUANTIZATION
            xq, xs = quantize_rows(x2, q.dtype, q.qmax, q.min_scale)
        else:
            xq, xs = ops.quantize_per_token(x2)
        return self._gemm(layer, xq, xs, dtype)

    def _gemm(self, layer: Linear, xq: torch.Tensor, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if layer.fp8_kernel:
            return ops.scaled_mm(xq, xs, layer.weight, layer.weight_scale.view(1, -1), dtype)
        return ops.reference_mm(xq, xs, layer.weight, layer.weight_scale[:, None], dtype)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        weight = layer.weight
        if weight.dtype != ops.FP8:  # online, before process_weights_after_loading
            return weight.data.float()
        if self.block is not None:
            return weight.float() * ops.expand_block_scales(layer.weight_scale, self.block, tuple(weight.shape))
        return weight.float() * layer.weight_scale[:, None]

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        """Checkpoint values for one dense ``[out, in]`` weight, as this configuration's files store them."""
        if not self.serialized:
            return {"weight": weight}
        if self.block is not None:
            bn, bk = self.block
            n, k = weight.shape
            blocks = torch.nn.functional.pad(weight.float(), (0, -k % bk, 0, -n % bn))
            blocks = blocks.reshape(-(-n // bn), bn, -(-k // bk), bk)
            scale = (blocks.abs().amax(dim=(1, 3)) / ops.FP8_MAX).clamp_min(ops.MIN_SCALE)
            q = ops.to_fp8(weight, ops.expand_block_scales(scale, self.block, (n, k)))
            return {"weight": q, "weight_scale_inv": scale}
        scale = (weight.abs().amax().float() / ops.FP8_MAX).clamp_min(ops.MIN_SCALE).reshape(1)
        values = {"weight": ops.to_fp8(weight, scale), "weight_scale": scale}
        if self.static_activations:
            values["input_scale"] = torch.tensor([4.0 / ops.FP8_MAX])  # calibrated for |x| <= ~4
        return values


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


def _copy_rows(param: torch.Tensor, value: torch.Tensor, start: int, size: int) -> None:
    target = param.data[start : start + size]
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"shape {tuple(value.shape)} does not match the expected {tuple(target.shape)}")
    target.copy_(value)
