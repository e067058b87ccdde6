"""Token embedding and the LM head (tied to the embedding or not)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from kvik.quantization.base import PackedMatmul, QuantizationMethod


class VocabEmbedding(nn.Module):
    """``weight[input_ids]`` with ``weight`` of shape [vocab_size, hidden_size].

    A tied head packed by its quantization method may serve the lookups instead (:meth:`look_up_from`):
    ``weight`` is then a shape-only meta tensor, and reading it (``dense_weight``) decodes the rows back."""

    # The rows' source when a packed tied head serves the lookups (kvik.quantization.base.PackedRows.rows).
    packed_rows: Callable[[torch.Tensor], torch.Tensor] | None = None

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
        if self.packed_rows is not None:
            return self.packed_rows(input_ids)
        return F.embedding(input_ids, self.weight)

    def look_up_from(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Serve lookups from ``rows`` (a packed tied head's, the same values) and hold no dense weight: SmolLM2's
        bf16 embedding is 54 MiB of a one-chat run's ~490 MiB."""
        self.packed_rows = rows
        self._dense_device = self.weight.device
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"), False)

    @property
    def dense_weight(self) -> torch.Tensor:
        """``weight``, decoded back from the packed rows first if lookups came from them (a dense consumer: the
        head of a batch-invariant or dequantized model)."""
        if self.packed_rows is not None:
            dense = torch.empty(self.weight.shape, dtype=self.weight.dtype, device=self._dense_device)
            for start in range(0, self.vocab_size, 4096):
                ids = torch.arange(start, min(start + 4096, self.vocab_size), device=self._dense_device)
                dense[start : start + len(ids)] = self.packed_rows(ids)
            self.weight = nn.Parameter(dense, requires_grad=False)
            self.packed_rows = None
        return self.weight

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
        return self._tied_to[0].dense_weight if self.tied else self.weight

    def load_packed(self, value: Any) -> None:
        """Multiply by the quantized checkpoint rows ``value`` through the checkpoint method's packed kernel
        from now on, when it offers one for this dtype and device (:meth:`QuantizationMethod.pack_lm_head`);
        one that also decodes rows serves the tied embedding's lookups too."""
        from kvik.quantization.base import PackedRows

        if self._packer is not None and self.tied:
            embedding = self._tied_to[0]
            weight = embedding.weight
            self.packed_matmul = self._packer.pack_lm_head(value, weight.dtype, weight.device)
            if isinstance(self.packed_matmul, PackedRows) and embedding.packed_rows is None:
                embedding.look_up_from(self.packed_matmul.rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        if self.packed_matmul is not None:
            return self.packed_matmul(hidden).float()
        return F.linear(hidden, self.head_weight).float()

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, tied={self.tied}"
