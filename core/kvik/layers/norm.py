"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, reduced in float32 like Hugging Face's."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # HF's rounding: normalize in float32, round to x's dtype, then multiply by the weight in that dtype.
        # On the CPU, F.rms_norm without a weight does the first two in one call, bitwise the same as the
        # steps written out (345,600 of 345,600 bf16 values over 1e-2..1e2 scales) and cheaper (11.5 against
        # 14.8 µs a call at one 576-wide row, where a single stream runs 61 of them a token). Other devices
        # keep the written-out steps their HF parity was checked with (CUDA's own fused norm is a plugin's).
        if x.device.type == "cpu":
            return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: the normed ``x``. With it: ``(norm(x + residual), x + residual)``.

        The fused form lets a decoder layer carry the residual stream without
        an extra add at each call site (the add happens in the input dtype, as in HF).
        """
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as an offset from one (``x_normed * (1 + weight)``),
    and the multiply happens in float32 before the cast back (HF's Gemma rounding, unlike Llama's).

    A subclass, not a flag, so platform transforms that swap exact ``RMSNorm`` types for fused
    kernels leave it alone.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(hidden_size, eps, dtype, device)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class AddLayerNorm(nn.LayerNorm):
    """``LayerNorm(x + residual)``: a post-LN sublayer's output (BERT). One module, so a platform can
    fuse the add into the norm; the add rounds to the input dtype first, as the eager form does."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x if residual is None else x + residual)
