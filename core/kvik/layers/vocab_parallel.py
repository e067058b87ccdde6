"""Vocabulary-parallel token embedding and LM head.

Each rank holds rows ``[rank * V/N, (rank + 1) * V/N)`` of the ``[V, hidden]`` table.
The embedding looks up the ids in its range, zeroes the others and sums over the
group (one all-reduce); the head computes the logits of its vocabulary slice and the
slices are gathered, so every rank of the group holds the full ``[n, V]`` logits and
samples the same tokens (same seeds, same inputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kvik.distributed.sharding import narrow, split_evenly
from kvik.layers.embedding import LMHead, VocabEmbedding

if TYPE_CHECKING:
    from kvik.distributed.parallel_state import ParallelState
    from kvik.models.interface import ModelBuildContext


class _RowsOfVocab:
    """Shared loading of this rank's vocabulary rows (``weight`` is [V/N, hidden])."""

    weight: Any
    vocab_start: int
    _loaded: bool

    def load_checkpoint_weight(self, rest: str, value: Any, name: str) -> bool:
        if rest != "weight":
            return False
        rows = narrow(value, 0, self.vocab_start, self.weight.shape[0])
        self.weight.data.copy_(rows.to(self.weight.dtype))
        self._loaded = True
        return True

    def missing_checkpoint_weights(self) -> list[str]:
        return [] if self._loaded else ["weight"]


class VocabParallelEmbedding(_RowsOfVocab, VocabEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState, **kwargs: Any) -> None:
        local = split_evenly(vocab_size, parallel.tp_size, "the vocabulary size")
        super().__init__(local, hidden_size, **kwargs)
        self.full_vocab_size = vocab_size
        self.vocab_start = parallel.tp_rank * local
        self._parallel = [parallel]  # a list: not a submodule
        self._loaded = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden]
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.vocab_size)
        out = F.embedding(local.clamp(0, self.vocab_size - 1), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self._parallel[0].all_reduce(out)


class ParallelLMHead(_RowsOfVocab, LMHead):
    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabParallelEmbedding | None,
                 parallel: ParallelState, **kwargs: Any) -> None:  # fmt: skip
        local = split_evenly(vocab_size, parallel.tp_size, "the vocabulary size")
        super().__init__(local, hidden_size, tie_to, **kwargs)
        self.vocab_start = parallel.tp_rank * local
        self._parallel = [parallel]
        self._loaded = self.tied  # a tied head loads nothing of its own

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        return self._parallel[0].all_gather_last(F.linear(hidden, self.head_weight).float())


def vocab_embedding(ctx: ModelBuildContext, vocab_size: int, hidden_size: int) -> VocabEmbedding:
    if ctx.parallel.tp_size == 1:
        return VocabEmbedding(vocab_size, hidden_size, ctx.dtype, ctx.device)
    return VocabParallelEmbedding(vocab_size, hidden_size, ctx.parallel, dtype=ctx.dtype, device=ctx.device)


def lm_head(ctx: ModelBuildContext, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None) -> LMHead:
    if ctx.parallel.tp_size == 1:
        return LMHead(vocab_size, hidden_size, tie_to, ctx.dtype, ctx.device, packer=ctx.quant_method)
    assert tie_to is None or isinstance(tie_to, VocabParallelEmbedding)
    return ParallelLMHead(vocab_size, hidden_size, tie_to, ctx.parallel, dtype=ctx.dtype, device=ctx.device)
