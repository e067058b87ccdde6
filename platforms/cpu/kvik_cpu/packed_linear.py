"""Dense bfloat16 linear layers through oneDNN with their weights packed once, at load.

``F.linear`` on a bfloat16 CPU tensor already runs oneDNN, but it reorders the weight into
oneDNN's blocked layout on every call. Packing it once (``mkldnn._reorder_linear_weight``, the
op inductor's CPU weight prepacking uses) and multiplying with ``mkldnn._linear_pointwise``
gives the same bits, and on the 2-core development VM (AVX512-BF16, no AMX) is 1.3-2.5x faster
on SmolLM2's shapes: 173 -> 68 µs for one row of the 576 -> 3,072 projection, 591 -> 350 µs for 32
rows (docs/benchmarks.md). float32 keeps ``F.linear``: there oneDNN's sums differ from MKL's in
the last bits, and float32 is the mode that matches transformers exactly.
"""

from __future__ import annotations

import torch
from kvik.layers.linear import Linear
from kvik.quantization.unquantized import UnquantizedLinearMethod
from torch import nn

BATCH_HINT = 32  # the row count oneDNN picks the packed layout for; any row count runs (equal bits)


class OneDNNLinear(Linear):
    """A :class:`Linear` whose weight lives in ``packed_weight`` (oneDNN's layout); ``weight`` is shape only."""

    packed_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.input_size)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.output_size)


def onednn_bf16_supported() -> bool:
    """oneDNN is built in and this CPU has the instructions its bfloat16 kernels need.

    Without them (AVX2-only x86, e.g. CI's machines) ``_reorder_linear_weight`` raises rather than
    falling back, so packing is skipped and ``F.linear`` runs as before."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_pack(module: nn.Module) -> bool:
    """A plain dense bfloat16 :class:`Linear` on the CPU, with oneDNN's bfloat16 kernels usable here."""
    return (
        type(module) is Linear
        and type(module.quant_method) is UnquantizedLinearMethod
        and module.weight.dtype == torch.bfloat16
        and module.weight.device.type == "cpu"
        and onednn_bf16_supported()
    )


def pack_linears(model: nn.Module) -> int:
    """Switch every packable linear of ``model`` to :class:`OneDNNLinear` in place; return how many.

    The dense weight is released (a meta tensor of its shape stays as ``weight``), so memory does
    not grow."""
    count = 0
    for module in list(model.modules()):
        if not can_pack(module):
            continue
        assert isinstance(module, Linear)
        weight = module.weight.detach()
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        module.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
        module.__class__ = OneDNNLinear
        count += 1
    return count


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the packed weights (not among the model's parameters)."""
    return sum(m.packed_weight.numel() * m.packed_weight.element_size() for m in model.modules()
               if isinstance(m, OneDNNLinear))  # fmt: skip
