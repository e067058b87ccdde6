"""Gemma 2: soft-capped attention and logits, alternating local/global layers, GeGLU, four norms a layer.

Differences from Llama, each visible below:
- embeddings scaled by ``sqrt(hidden_size)`` (rounded to the weight dtype, as HF does);
- RMSNorm weights stored as offsets from one (:class:`~kvik.layers.norm.GemmaRMSNorm`), and a
  norm after attention and after the MLP as well as before each (pre + post norms);
- attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped at
  ``attn_logit_softcapping`` inside the attention backend; final logits capped at
  ``final_logit_softcapping`` (:func:`~kvik.layers.softcap.soft_cap`);
- ``layer_types`` alternates sliding-window and global layers, each with its own window;
- a GeGLU (tanh-approximated GELU) MLP.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvik.attention.backend import AttentionMetadata
from kvik.layers.activation import GeluTanhAndMul
from kvik.layers.embedding import VocabEmbedding
from kvik.layers.norm import GemmaRMSNorm
from kvik.layers.rope_settings import RopeSettings
from kvik.layers.rotary import RotaryEmbedding, rope_settings
from kvik.layers.softcap import soft_cap
from kvik.models.interface import ModelBuildContext
from kvik.models.llama import CosSin, LlamaAttention, LlamaForCausalLM, LlamaMLP, head_dim_of

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


class Gemma2DecoderLayer(nn.Module):
    """``x + post_norm(attn(norm(x)))``, then ``x + post_ff_norm(mlp(pre_ff_norm(x)))``."""

    def __init__(self, ctx: ModelBuildContext, arch: type[Gemma2ForCausalLM], index: int) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        norm = partial(GemmaRMSNorm, cfg.hidden_size, getattr(cfg, "rms_norm_eps", 1e-6), ctx.dtype, ctx.device)
        self.self_attn = arch.make_attention_layer(ctx, index)
        self.mlp = arch.make_mlp(ctx, index)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(
        self,
        hidden: torch.Tensor,  # [n, hidden]
        cos_sin: CosSin,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden), cos_sin, rotary, kv_cache, metadata)
        hidden = hidden + self.post_attention_layernorm(attn)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma2Model(nn.Module):
    """The module tree under ``model.``; ``rotary_emb_local`` serves sliding layers when their rope differs."""

    def __init__(self, ctx: ModelBuildContext, arch: type[Gemma2ForCausalLM]) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.dtype, ctx.device)
        # HF multiplies by sqrt(hidden) held in the weight dtype (so bf16 rounds it first).
        self.embed_scale = float(torch.tensor(cfg.hidden_size**0.5, dtype=ctx.dtype))
        self.layers = nn.ModuleList(Gemma2DecoderLayer(ctx, arch, i) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, getattr(cfg, "rms_norm_eps", 1e-6), ctx.dtype, ctx.device)

        def rotary(rope: RopeSettings) -> RotaryEmbedding:
            return RotaryEmbedding(
                head_dim_of(cfg), rope, int(cfg.max_position_embeddings), ctx.model_config.max_model_len, ctx.device
            )

        self.rotary_emb = rotary(rope_settings(cfg))
        local = arch.local_rope(cfg)
        self.rotary_emb_local = rotary(local) if local is not None else None
        # Which rotary each layer uses: True for the local one.
        self.uses_local = [
            self.rotary_emb_local is not None and arch.layer_sliding_window(cfg, i) is not None
            for i in range(cfg.num_hidden_layers)
        ]


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 on kvik's paged attention (see the module docstring)."""

    model_cls = Gemma2Model

    def __init__(self, ctx: ModelBuildContext) -> None:
        cfg = ctx.model_config.hf_config
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or "gelu_pytorch_tanh"
        if act not in _GELU_TANH:
            raise ValueError(f"{type(self).__name__}: hidden_activation {act!r} is not supported (only {_GELU_TANH})")
        super().__init__(ctx)
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)

    # -- architecture hooks ---------------------------------------------------------
    @classmethod
    def layer_sliding_window(cls, cfg: Any, index: int) -> int | None:
        window = getattr(cfg, "sliding_window", None)
        if not window:
            return None
        if getattr(cfg, "layer_types", None) is not None:
            return super().layer_sliding_window(cfg, index)
        return int(window) if cls.is_sliding_by_default(cfg, index) else None

    @classmethod
    def is_sliding_by_default(cls, cfg: Any, index: int) -> bool:
        """Which layers slide in a config without ``layer_types`` (Gemma 2: the even ones)."""
        return index % 2 == 0

    @classmethod
    def local_rope(cls, cfg: Any) -> RopeSettings | None:
        """Rope settings of sliding layers when they differ from the global ones (None: they don't)."""
        return None

    @classmethod
    def qk_norm(cls, cfg: Any, ctx: ModelBuildContext) -> Any:
        return None

    @classmethod
    def make_attention_layer(cls, ctx: ModelBuildContext, index: int) -> nn.Module:
        cfg = ctx.model_config.hf_config
        bias = bool(getattr(cfg, "attention_bias", False))
        scalar = getattr(cfg, "query_pre_attn_scalar", None) or head_dim_of(cfg)
        return LlamaAttention(
            ctx,
            bias,
            bias,
            cls.layer_sliding_window(cfg, index),
            scale=float(scalar) ** -0.5,
            logits_soft_cap=getattr(cfg, "attn_logit_softcapping", None),
            qk_norm=cls.qk_norm(cfg, ctx),
        )

    @classmethod
    def make_mlp(cls, ctx: ModelBuildContext, index: int) -> nn.Module:
        return LlamaMLP(ctx, False, act=GeluTanhAndMul())

    # -- running ------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        model = self.model
        hidden = model.embed_tokens(input_ids) * model.embed_scale
        rotary, local = model.rotary_emb, model.rotary_emb_local
        cos_sin = rotary.cos_sin(positions, hidden.dtype)
        local_cos_sin = local.cos_sin(positions, hidden.dtype) if local is not None else cos_sin
        for layer, kv_cache, uses_local in zip(model.layers, kv_caches, model.uses_local, strict=True):
            if uses_local:
                hidden = layer(hidden, local_cos_sin, local, kv_cache, metadata)
            else:
                hidden = layer(hidden, cos_sin, rotary, kv_cache, metadata)
        return model.norm(hidden)  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.final_logit_softcapping:
            return self.lm_head(hidden)
        # Capped in the model dtype before the float32 cast, rounding where HF does.
        logits = F.linear(hidden, self.lm_head.head_weight)
        return soft_cap(logits, self.final_logit_softcapping).float()
