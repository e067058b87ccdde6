"""Token embedding and the LM head (tied to the embedding or not)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from kvik.quantization.base import PackedMatmul, QuantizationMethod


class VocabEmbedding(nn.Module):
    """``weight[input_ids]`` with ``weight`` of shape [vocab_size, hidden_size]."""

    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden]
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}"


class LMHead(nn.Module):
    """Hidden states -> float32 logits, sharing the embedding's weight when tied.

    A tied head registers no parameter of its own, so the checkpoint's
    ``lm_head.weight`` (when a tied model still ships one) is not expected.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tie_to: VocabEmbedding | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        packer: QuantizationMethod | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tie_to is not None
        # The checkpoint's quantization method, which may multiply a tied head by its quantized rows (load_packed).
        self._packer = packer
        # A plain attribute list keeps the embedding out of this module's children
        # (it must not be registered twice, nor appear as lm_head.weight).
        self._tied_to: list[VocabEmbedding] = [tie_to] if tie_to is not None else []
        if tie_to is None:
            self.weight = nn.Parameter(
                torch.empty(vocab_size, hidden_size, dtype=dtype, device=device), requires_grad=False
            )
        # A tied head whose checkpoint rows are quantized may multiply by them packed (load_packed).
        self.packed_matmul: PackedMatmul | None = None

    @property
    def head_weight(self) -> torch.Tensor:
        return self._tied_to[0].weight if self.tied else self.weight

    def load_packed(self, value: Any) -> None:
        """Multiply by the quantized checkpoint rows ``value`` through the checkpoint method's packed kernel
        from now on, when it offers one for this dtype and device (:meth:`QuantizationMethod.pack_lm_head`)."""
        if self._packer is not None:
            weight = self.head_weight
            self.packed_matmul = self._packer.pack_lm_head(value, weight.dtype, weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        if self.packed_matmul is not None:
            return self.packed_matmul(hidden).float()
        return F.linear(hidden, self.head_weight).float()

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, tied={self.tied}"
