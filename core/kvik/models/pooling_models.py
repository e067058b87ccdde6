"""Pooling architectures on kvik's decoder skeleton: embedders and sequence classifiers.

* ``LlamaModel`` / ``MistralModel`` / ``Qwen2Model`` / ``Qwen3Model``: the bare
  body (what ``AutoModel.save_pretrained`` writes, and what decoder embedders
  such as Qwen3-Embedding and gte-Qwen ship). Checkpoint names come with or
  without the ``model.`` prefix; a shipped ``lm_head.weight`` is ignored. A
  ``*ForCausalLM`` checkpoint served with ``runner="pooling"`` is built as one
  of these (see :func:`kvik.pooling.architectures.pooling_architecture`).
* ``*ForSequenceClassification``: the body plus a bias-free ``score`` layer
  applied to the pooled (last-token) state: cross-encoder rerankers and
  classifiers. Exposed to the runner as ``pooler_head``.

Both run the causal paged-attention forward unchanged and never compute logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvik.layers.embedding import LMHead
from kvik.models.interface import ModelBuildContext
from kvik.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from kvik.models.qwen3 import Qwen3ForCausalLM
from kvik.pooling.architectures import FAMILIES

# Body name -> the causal LM class whose layers it shares.
_BODIES: dict[str, type[LlamaForCausalLM]] = {  # one per kvik.pooling.architectures.FAMILIES
    "Llama": LlamaForCausalLM,
    "Mistral": MistralForCausalLM,
    "Qwen2": Qwen2ForCausalLM,
    "Qwen3": Qwen3ForCausalLM,
}


class _PoolingBody:
    """Mixin: the causal LM's body with a tied (parameter-free) head and prefix-tolerant names."""

    is_pooling_model = True

    def _drop_head(self: Any) -> None:
        cfg_vocab, hidden = self.model.embed_tokens.weight.shape
        self.lm_head = LMHead(
            cfg_vocab, hidden, self.model.embed_tokens, self.dtype, self.model.embed_tokens.weight.device
        )

    @classmethod
    def sanitize(cls, name: str) -> str:
        if name.startswith(("model.", "score.", "lm_head.")):
            return name
        return f"model.{name}"  # a bare-body checkpoint: "layers.0...", "embed_tokens.weight", "norm.weight"


class ScoreHead(nn.Module):
    """The classifier's bias-free ``score`` layer (``score.weight`` [num_labels, hidden]), run in float32."""

    def __init__(self, hidden_size: int, num_labels: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_labels, hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled.float() @ self.weight.float().t()


def _body_class(family: str, base: type[LlamaForCausalLM]) -> type[LlamaForCausalLM]:
    class Body(_PoolingBody, base):  # type: ignore[misc,valid-type]
        def __init__(self, ctx: ModelBuildContext) -> None:
            super().__init__(ctx)
            self._drop_head()

    Body.__name__ = Body.__qualname__ = f"{family}Model"
    Body.__doc__ = f"The {family} decoder body for embeddings (pooled by the runner)."
    return Body


def _classifier_class(family: str, base: type[LlamaForCausalLM]) -> type[LlamaForCausalLM]:
    class Classifier(_PoolingBody, base):  # type: ignore[misc,valid-type]
        def __init__(self, ctx: ModelBuildContext) -> None:
            super().__init__(ctx)
            self._drop_head()
            cfg = ctx.model_config.hf_config
            num_labels = int(getattr(cfg, "num_labels", None) or len(getattr(cfg, "id2label", None) or {}) or 2)
            self.score = ScoreHead(cfg.hidden_size, num_labels, ctx.dtype, ctx.device)

        def pooler_head(self, pooled: torch.Tensor) -> torch.Tensor:
            """[P, hidden] float32 pooled states -> [P, num_labels] logits."""
            return self.score(pooled)

    Classifier.__name__ = Classifier.__qualname__ = f"{family}ForSequenceClassification"
    Classifier.__doc__ = f"{family} with a sequence-classification ``score`` head on the last token."
    return Classifier


LlamaModel = _body_class("Llama", LlamaForCausalLM)
MistralModel = _body_class("Mistral", MistralForCausalLM)
Qwen2Model = _body_class("Qwen2", Qwen2ForCausalLM)
Qwen3Model = _body_class("Qwen3", Qwen3ForCausalLM)
LlamaForSequenceClassification = _classifier_class("Llama", LlamaForCausalLM)
MistralForSequenceClassification = _classifier_class("Mistral", MistralForCausalLM)
Qwen2ForSequenceClassification = _classifier_class("Qwen2", Qwen2ForCausalLM)
Qwen3ForSequenceClassification = _classifier_class("Qwen3", Qwen3ForCausalLM)

assert set(_BODIES) == set(FAMILIES)
