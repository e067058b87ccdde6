"""ParallelLlama: Llama with the GPT-J / PaLM parallel block.

A Llama layer runs attention, then the MLP on the attention's output::

    h = x + attn(norm1(x));  out = h + mlp(norm2(h))

The parallel block feeds both from one normalised input and adds both to the
residual, so the two matmul groups of a layer do not wait on each other::

    out = x + attn(norm(x)) + mlp(norm(x))

Everything else (rotary GQA attention, SiLU-gated MLP, RMSNorm, weight names
and loading) is Llama's, so this file reuses kvik's Llama pieces and only
defines the layer and the module tree that holds it.
"""

from __future__ import annotations

import torch
from kvik.attention.backend import AttentionMetadata
from kvik.layers.embedding import LMHead, VocabEmbedding
from kvik.layers.norm import RMSNorm
from kvik.layers.rotary import RotaryEmbedding, rope_settings
from kvik.models.interface import ModelBuildContext
from kvik.models.llama import CosSin, LlamaAttention, LlamaForCausalLM, LlamaMLP, head_dim_of
from torch import nn


class ParallelLlamaDecoderLayer(nn.Module):
    """One parallel block; same call signature as kvik's Llama layer (residual carried separately)."""

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        bias = bool(getattr(cfg, "attention_bias", False))
        self.self_attn = LlamaAttention(ctx, bias, bias, sliding_window=None)
        self.mlp = LlamaMLP(ctx, bool(getattr(cfg, "mlp_bias", False)))
        # The only norm of the layer: Llama's post_attention_layernorm does not exist here.
        self.input_layernorm = RMSNorm(cfg.hidden_size, getattr(cfg, "rms_norm_eps", 1e-6), ctx.dtype, ctx.device)

    def forward(
        self,
        hidden: torch.Tensor,  # [n, hidden]: the previous layer's output (not yet added)
        residual: torch.Tensor | None,  # [n, hidden]: the residual stream before that output
        cos_sin: CosSin,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)  # residual := hidden + residual
        out = self.self_attn(normed, cos_sin, rotary, kv_cache, metadata) + self.mlp(normed)
        return out, residual


class ParallelLlamaModel(nn.Module):
    """The module tree under ``model.``: names match Llama checkpoints."""

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.dtype, ctx.device)
        self.layers = nn.ModuleList(ParallelLlamaDecoderLayer(ctx) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, getattr(cfg, "rms_norm_eps", 1e-6), ctx.dtype, ctx.device)
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(cfg),
            rope_settings(cfg),
            int(cfg.max_position_embeddings),
            ctx.model_config.max_model_len,
            ctx.device,
        )


class ParallelLlamaForCausalLM(LlamaForCausalLM):
    """Llama with parallel attention + MLP blocks.

    ``forward``, ``compute_logits``, ``load_weights`` and ``missing_weights``
    are inherited: they only rely on the attribute names set here.
    """

    def __init__(self, ctx: ModelBuildContext) -> None:
        # Skip LlamaForCausalLM.__init__: it would build (and allocate) Llama's sequential layers.
        nn.Module.__init__(self)
        cfg = ctx.model_config.hf_config
        self.dtype = ctx.dtype
        self.model = ParallelLlamaModel(ctx)  # type: ignore[assignment]
        tie = self.model.embed_tokens if getattr(cfg, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tie, ctx.dtype, ctx.device)
        self._loaded: set[str] = set()

    @classmethod
    def layer_sliding_window(cls, cfg: object, index: int) -> int | None:
        return None  # full attention in every layer
