"""Qwen3: Qwen2's decoder without q/k/v biases, with an RMSNorm over each head of q and k.

The per-head norms (``self_attn.q_norm`` / ``k_norm``, weight [head_dim]) run
after the projections and before rotary.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from kvik.layers.norm import RMSNorm
from kvik.models.interface import ModelBuildContext
from kvik.models.llama import LlamaAttention, Qwen2ForCausalLM


def qk_norm_attention(cls: type[Qwen2ForCausalLM], ctx: ModelBuildContext, index: int) -> LlamaAttention:
    """Layer ``index``'s attention with Qwen3's per-head q/k RMSNorm (shared by Qwen3 and Qwen3-MoE)."""
    cfg = ctx.model_config.hf_config
    norm = partial(RMSNorm, eps=getattr(cfg, "rms_norm_eps", 1e-6), dtype=ctx.dtype, device=ctx.device)
    return LlamaAttention(ctx, cls.qkv_bias(cfg), cls.o_bias(cfg), cls.layer_sliding_window(cfg, index), qk_norm=norm)


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Qwen2's layer layout (sliding windows from ``max_window_layers``) plus q/k norms."""

    supports_tensor_parallel = True  # the Llama layers, unchanged (declared per class: not inherited)
    supports_pipeline_parallel = True

    @classmethod
    def qkv_bias(cls, cfg: Any) -> bool:
        return bool(getattr(cfg, "attention_bias", False))

    @classmethod
    def o_bias(cls, cfg: Any) -> bool:
        return bool(getattr(cfg, "attention_bias", False))

    @classmethod
    def make_attention_layer(cls, ctx: ModelBuildContext, index: int) -> nn.Module:
        return qk_norm_attention(cls, ctx, index)
