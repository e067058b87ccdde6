"""Qwen2-MoE (Qwen1.5-MoE): Qwen2's attention with sparse experts plus a gated shared expert.

The shared expert is a dense SiLU MLP of ``shared_expert_intermediate_size``
that every token passes through, scaled by ``sigmoid(shared_expert_gate(x))``
and added to the routed experts' output.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kvik.models.interface import ModelBuildContext
from kvik.models.llama import LlamaMLP, Qwen2ForCausalLM
from kvik.models.mixtral import required
from kvik.models.qwen3_moe import is_sparse_layer, sparse_moe


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Qwen2 (q/k/v biases per ``qkv_bias``) with routed + shared experts."""

    @classmethod
    def qkv_bias(cls, cfg: Any) -> bool:
        return bool(getattr(cfg, "qkv_bias", True))

    @classmethod
    def make_mlp(cls, ctx: ModelBuildContext, index: int) -> nn.Module:
        cfg = ctx.model_config.hf_config
        if not is_sparse_layer(cfg, index):
            return LlamaMLP(ctx, False)
        shared = None
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            shared = LlamaMLP(ctx, False, intermediate_size=required(cfg, "shared_expert_intermediate_size"))
        return sparse_moe(ctx, shared)
