"""INT4 weight-only linear layers: GPTQ, AWQ and compressed-tensors ``pack-quantized`` checkpoints.

Every format is repacked at load into one layout (:mod:`kvik_quant.int4_pack`), so one
kernel runs them all: the Triton dequantize-in-GEMM kernel on GPUs
(:mod:`kvik_quant.int4_kernel`), the torch reference (dequantize, then matmul in the
activation dtype) elsewhere. Act-order checkpoints (a permuted ``g_idx``) are made
group-contiguous by permuting the weight's input rows once; each call then gathers
``x[:, perm]``.

Supported: 4 bits, groups of 32, 64 or 128 input features (or one group per output channel),
with or without zero points and act-order. Anything else is refused at load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from kvik.quantization.base import QuantizationMethod

from kvik_quant import device as dev
from kvik_quant import int4_pack as pack

if TYPE_CHECKING:
    from kvik.layers.linear import Linear

GROUP_SIZES = (32, 64, 128)


def check_bits_and_group(method: str, bits: Any, group: Any) -> int:
    """The group size (-1: per channel); ValueError naming what is supported otherwise."""
    if bits != 4:
        raise ValueError(f"{method}: {bits}-bit weights are not supported; kvik-quant runs 4-bit (bits=4) only")
    if group in (-1, None, 0):
        return -1
    if group not in GROUP_SIZES:
        raise ValueError(
            f"{method}: group_size {group} is not supported; supported: {', '.join(map(str, GROUP_SIZES))} "
            "or -1 (one group per output channel)"
        )
    return int(group)


class Int4LinearMethod(QuantizationMethod):
    """The shared storage, repacking and compute; subclasses map one checkpoint format onto it."""

    name = "int4"
    devices: ClassVar[tuple[str, ...]] = ("cuda",)
    device_requirements: ClassVar[str] = "Triton; other devices run the torch reference"
    supported_act_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, group_size: int = 128) -> None:
        self.group_size = group_size  # -1: one group spanning all K inputs

    def group(self, layer: Linear) -> int:
        return layer.input_size if self.group_size == -1 else self.group_size

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        k, n, g = layer.input_size, layer.output_size, self.group(layer)
        if k % g or k % 8 or any(size % 8 for size in layer.output_sizes):
            raise ValueError(
                f"{self.name}: a layer of {k} inputs and outputs {layer.output_sizes} cannot be packed in "
                f"groups of {g} (inputs must be a multiple of the group size and of 8, outputs of 8)"
            )
        layer.qweight = _param(torch.zeros(k // 8, n, dtype=torch.int32, device=device))
        layer.scales = _param(torch.ones(k // g, n, dtype=dtype, device=device))
        layer.zeros = _param(torch.full((k // g, n), 8.0, dtype=dtype, device=device))  # symmetric: the midpoint
        layer.int4_g_idx = [None] * len(layer.output_sizes)  # per shard, until process_weights_after_loading

    # -- helpers the formats load through --------------------------------------------------------
    def store(self, layer: Linear, name: str, value: torch.Tensor, shard: int | None) -> None:
        """Copy ``value`` (already in kvik's layout, ``[rows, shard columns]``) into ``name``'s columns."""
        target = getattr(layer, name).data[:, layer.shard_rows(shard)]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{self.name}: {name} of shape {tuple(value.shape)} does not fit the expected {tuple(target.shape)} "
                f"(group size {self.group(layer)})"
            )
        target.copy_(value)

    def store_g_idx(self, layer: Linear, value: torch.Tensor, shard: int | None) -> None:
        if value.shape != (layer.input_size,):
            raise ValueError(f"{self.name}: g_idx has shape {tuple(value.shape)}, expected ({layer.input_size},)")
        layer.int4_g_idx[shard or 0] = value.to(torch.int64)

    # -- after loading ------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: Linear) -> None:
        g = self.group(layer)
        k = layer.input_size
        given = [t for t in getattr(layer, "int4_g_idx", []) if t is not None]
        layer.int4_g_idx = []
        layer.perm = None
        layer.int4_kernel = layer.qweight.device.type == "cuda" and dev.triton_available()
        if not given:
            return
        device = layer.qweight.device  # g_idx may arrive on the host while the weights are on the device
        first = given[0].to(device)
        if any(not torch.equal(first, t.to(device)) for t in given[1:]):
            raise ValueError(f"{self.name}: the shards of one merged layer have different g_idx (act-order) orders")
        trivial = torch.arange(k, device=first.device) // g
        if torch.equal(first, trivial):
            return
        perm = torch.argsort(first, stable=True)
        if not torch.equal(first[perm], trivial):
            raise ValueError(f"{self.name}: g_idx does not put exactly {g} inputs in each group; cannot repack")
        codes = pack.unpack_rows(layer.qweight.data)[perm]  # row i is input feature perm[i]
        layer.qweight.data.copy_(pack.pack_rows(codes))
        layer.perm = perm

    # -- compute ------------------------------------------------------------------------------------
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.input_size)
        if layer.perm is not None:
            x2 = x2.index_select(1, layer.perm)
        if layer.int4_kernel:
            from kvik_quant.int4_kernel import int4_matmul

            y = int4_matmul(x2, layer.qweight, layer.scales, layer.zeros, self.group(layer))
        else:
            w_t = pack.dequantize_codes(
                pack.unpack_rows(layer.qweight), layer.scales, layer.zeros, self.group(layer), x.dtype
            )
            y = F.linear(x2, w_t.t())
        return y.reshape(*x.shape[:-1], layer.output_size)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        w_t = pack.dequantize_codes(
            pack.unpack_rows(layer.qweight), layer.scales, layer.zeros, self.group(layer), torch.float32
        )
        perm = getattr(layer, "perm", None)
        if perm is not None:  # back to the checkpoint's input order
            w_t = torch.empty_like(w_t).index_copy_(0, perm, w_t)
        return w_t.t().contiguous()


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


class Int4OnlineMethod(Int4LinearMethod):
    """``quantization="int4"``: a dense checkpoint quantized at load, symmetric round-to-nearest, groups of 128.

    No calibration (unlike GPTQ/AWQ), so it loses more accuracy than they do; it exists
    so that benchmarks and users can run the INT4 kernels on any dense checkpoint.
    """

    name = "int4"
    quantizes_dense_checkpoints = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Int4OnlineMethod:
        return cls(check_bits_and_group("int4", config.get("bits", 4), config.get("group_size", 128)))

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        super().create_weights(layer, dtype, device)  # checks the shape; its buffers are replaced below
        layer.weight = _param(torch.empty(layer.output_size, layer.input_size, dtype=dtype, device=device))

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if name != "weight":
            raise ValueError(f"int4 (quantized at load): unexpected parameter {name!r} in a dense checkpoint")
        target = layer.weight.data[layer.shard_rows(shard)]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"weight shape {tuple(value.shape)} does not match expected {tuple(target.shape)}")
        target.copy_(value)

    def process_weights_after_loading(self, layer: Linear) -> None:
        codes, scales, zeros = rtn_quantize(layer.weight.data, self.group_size, symmetric=True)
        del layer.weight
        layer.qweight.data.copy_(pack.pack_rows(codes.t()))
        layer.scales.data.copy_(scales.t())
        layer.zeros.data.copy_(zeros.t())
        super().process_weights_after_loading(layer)

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        return {"weight": weight}


class GPTQLinearMethod(Int4LinearMethod):
    """AutoGPTQ / GPTQModel checkpoints: ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (quant_method ``gptq``)."""

    name = "gptq"

    def __init__(self, group_size: int = 128, zero_offset: int = 1) -> None:
        super().__init__(group_size)
        self.zero_offset = zero_offset  # format v1 stores zero - 1; gptq_v2 stores the zero itself

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQLinearMethod:
        group = check_bits_and_group("gptq", config.get("bits", 4), config.get("group_size", 128))
        fmt = config.get("checkpoint_format", config.get("format", "gptq"))  # GPTQModel writes either key
        if config.get("lm_head"):
            raise ValueError("gptq: a quantized lm_head is not supported (kvik keeps lm_head dense); "
                             "quantize without lm_head=True")  # fmt: skip
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        if config.get("quant_method", "gptq") == "gptq" and config.get("is_marlin_format"):
            raise ValueError("gptq: Marlin-packed checkpoints are not supported; use the plain GPTQ export")
        return cls(group, zero_offset=1 if fmt == "gptq" else 0)

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if name == "qweight":  # already kvik's layout: [K/8, N]
            self.store(layer, "qweight", value.to(torch.int32), shard)
        elif name == "qzeros":  # [K/G, N/8] packed along N
            zeros = pack.unpack_last(value.to(torch.int32)) + self.zero_offset
            self.store(layer, "zeros", zeros.to(layer.zeros.dtype), shard)
        elif name == "scales":
            self.store(layer, "scales", value.to(layer.scales.dtype), shard)
        elif name == "g_idx":
            self.store_g_idx(layer, value, shard)
        else:
            raise ValueError(f"gptq: unexpected parameter {name!r} (expected qweight, qzeros, scales, g_idx)")

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        # v1 cannot store a zero of 0 (it would be written as -1), so its zeros start at 1.
        codes, scales, zeros = rtn_quantize(weight, self.group_size, symmetric=False, min_zero=self.zero_offset)
        return {
            "qweight": pack.pack_rows(codes.t()),
            "qzeros": pack.pack_last((zeros - self.zero_offset).t()),
            "scales": scales.t().to(torch.float16),
            "g_idx": torch.arange(weight.shape[1], dtype=torch.int32, device=weight.device) // self.group_for(weight),
        }

    def group_for(self, weight: torch.Tensor) -> int:
        return weight.shape[1] if self.group_size == -1 else self.group_size


class AWQLinearMethod(Int4LinearMethod):
    """AutoAWQ GEMM checkpoints: ``qweight`` ``[K, N/8]``, ``qzeros``, ``scales`` (quant_method ``awq``)."""

    name = "awq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQLinearMethod:
        bits = config.get("bits", config.get("w_bit", 4))
        group = check_bits_and_group("awq", bits, config.get("group_size", config.get("q_group_size", 128)))
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq: version {version!r} is not supported; kvik-quant reads AutoAWQ's GEMM packing")
        if config.get("zero_point", True) is False:
            raise ValueError("awq: checkpoints without zero points (zero_point=false) are not supported")
        return cls(group)

    def load_weight(self, layer: Linear, name: str, value: Any, shard: int | None) -> None:
        if name == "qweight":  # [K, N/8] interleaved along N -> codes [K, N] -> packed along K
            self.store(layer, "qweight", pack.pack_rows(pack.unpack_awq(value.to(torch.int32))), shard)
        elif name == "qzeros":
            self.store(layer, "zeros", pack.unpack_awq(value.to(torch.int32)).to(layer.zeros.dtype), shard)
        elif name == "scales":
            self.store(layer, "scales", value.to(layer.scales.dtype), shard)
        else:
            raise ValueError(f"awq: unexpected parameter {name!r} (expected qweight, qzeros, scales)")

    def quantize_for_test(self, weight: torch.Tensor) -> dict[str, Any]:
        codes, scales, zeros = rtn_quantize(weight, self.group_size, symmetric=False)
        return {
            "qweight": pack.pack_awq(codes.t()),
            "qzeros": pack.pack_awq(zeros.t()),
            "scales": scales.t().to(torch.float16),
        }


def rtn_quantize(weight: torch.Tensor, group_size: int, symmetric: bool, min_zero: int = 0) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest INT4 of ``[N, K]``: (codes ``[N, K]`` 0..15, scales ``[N, K/G]``, zeros ``[N, K/G]`` int).

    ``W ≈ (codes - zeros) * scales`` per group; symmetric puts every zero at 8.
    """
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    w = weight.float().reshape(n, k // g, g)
    if symmetric:
        scales = (w.abs().amax(dim=-1) / 7.5).clamp_min(1e-8)
        zeros = torch.full_like(scales, 8, dtype=torch.int64)
    else:
        lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp_min(1e-8)
        zeros = torch.round(-lo / scales).clamp(min_zero, 15).to(torch.int64)
    codes = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.int64)
    return codes.reshape(n, k), scales, zeros
