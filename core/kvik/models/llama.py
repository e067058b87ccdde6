"""Llama, Mistral and Qwen2: one decoder skeleton over kvik's paged attention.

The three differ only in biases and sliding-window layout, expressed as small
class hooks (:meth:`LlamaForCausalLM.qkv_bias` and friends). Other architectures
(Qwen3, Phi-3, Mixtral, Qwen3-MoE, Gemma) reuse the skeleton through the same
hooks: :meth:`~LlamaForCausalLM.make_attention_layer`, :meth:`~LlamaForCausalLM.make_mlp`,
``sanitize`` (checkpoint names) and the loader in :mod:`kvik.models.hf_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from kvik.attention.backend import AttentionMetadata
from kvik.distributed.parallel_state import ParallelState
from kvik.layers.activation import SiluAndMul
from kvik.layers.norm import RMSNorm
from kvik.layers.parallel_linear import column_linear, qkv_linear, row_linear
from kvik.layers.rotary import RotaryEmbedding, rope_settings
from kvik.layers.vocab_parallel import lm_head, vocab_embedding
from kvik.models.hf_weights import HFWeightLoader
from kvik.models.interface import ModelBuildContext
from kvik.models.model_config import layer_types_window

CosSin = tuple[torch.Tensor, torch.Tensor]


def head_dim_of(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


class LlamaAttention(nn.Module):
    """q/k/v projection, rotary, paged attention, output projection.

    Optional extras other architectures switch on: ``qk_norm`` builds a per-head
    norm of q and k applied before rotary (Qwen3, Gemma 3: ``norm(head_dim)``),
    ``scale`` replaces ``head_dim ** -0.5`` and ``logits_soft_cap`` asks the
    attention backend to cap scores with ``cap * tanh(score / cap)`` (Gemma 2).
    """

    def __init__(
        self,
        ctx: ModelBuildContext,
        bias: bool,
        o_bias: bool,
        sliding_window: int | None,
        *,
        scale: float | None = None,
        logits_soft_cap: float | None = None,
        qk_norm: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        total_heads = cfg.num_attention_heads
        total_kv_heads = getattr(cfg, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(cfg)
        # Under tensor parallelism this rank's heads only (kvik.layers.parallel_linear).
        self.qkv_proj, self.num_heads, self.num_kv_heads = qkv_linear(
            ctx, cfg.hidden_size, total_heads, total_kv_heads, self.head_dim, bias
        )
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.o_proj = row_linear(ctx, total_heads * self.head_dim, cfg.hidden_size, o_bias)
        # Only asked for when set, so backends that predate the argument keep working.
        extra = {"logits_soft_cap": logits_soft_cap} if logits_soft_cap else {}
        self.attn = ctx.make_attention(
            self.num_heads,
            self.head_dim,
            self.num_kv_heads,
            scale if scale is not None else self.head_dim**-0.5,
            sliding_window,
            **extra,
        )
        self.q_norm = qk_norm(self.head_dim) if qk_norm is not None else None
        self.k_norm = qk_norm(self.head_dim) if qk_norm is not None else None

    def forward(
        self,
        hidden: torch.Tensor,  # [n, hidden]
        cos_sin: CosSin,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        # A backend that rotates (and norms) q and k inside attention saves a pass over them, e.g. a kernel
        # launch per layer of a GPU decode step.
        fused = rotary.kernel_inputs(q, k, cos_sin, self.q_norm, self.k_norm) if self.attn.fuses_rotary(kv_cache, metadata) else None
        if fused is not None:
            out = self.attn.forward_rotary(q, k, v, fused, kv_cache, metadata)
        else:
            q, k = rotary(q, k, cos_sin, self.q_norm, self.k_norm)  # per-head norms first, where the model has them
            out = self.attn.forward(q, k, v, kv_cache, metadata)  # [n, heads, head_dim]
        return self.o_proj(out.reshape(n, -1))


class LlamaMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; ``act`` is SiLU unless given (Gemma: tanh-GELU)."""

    def __init__(
        self,
        ctx: ModelBuildContext,
        bias: bool,
        intermediate_size: int | None = None,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = column_linear(ctx, cfg.hidden_size, [inter, inter], bias)
        self.down_proj = row_linear(ctx, inter, cfg.hidden_size, bias)
        self.act = act if act is not None else SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, ctx: ModelBuildContext, arch: type[LlamaForCausalLM], index: int) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.self_attn = arch.make_attention_layer(ctx, index)
        self.mlp = arch.make_mlp(ctx, index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, ctx.dtype, ctx.device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, ctx.dtype, ctx.device)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: CosSin,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)  # type: ignore[assignment]
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos_sin, rotary, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class MissingLayer(nn.Module):
    """A decoder layer another pipeline stage runs: no weights here, never called."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("this decoder layer belongs to another pipeline stage")


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm. A pipeline stage builds only its layers (the others are
    :class:`MissingLayer`); the embedding lives on the first stage (and on the last when the head is
    tied to it), the final norm on the last."""

    def __init__(self, ctx: ModelBuildContext, arch: type[LlamaForCausalLM]) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        p = ctx.parallel
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.start, self.end = p.layer_range(cfg.num_hidden_layers)
        self.embed_tokens = (
            vocab_embedding(ctx, cfg.vocab_size, cfg.hidden_size) if p.is_first_stage or (p.is_last_stage and tied) else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(ctx, arch, i) if self.start <= i < self.end else MissingLayer()
            for i in range(cfg.num_hidden_layers)
        )
        eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.norm = RMSNorm(cfg.hidden_size, eps, ctx.dtype, ctx.device) if p.is_last_stage else None
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(cfg),
            rope_settings(cfg),
            int(cfg.max_position_embeddings),
            ctx.model_config.max_model_len,
            ctx.device,
        )


class LlamaForCausalLM(HFWeightLoader, nn.Module):
    """Decoder-only transformer with RMSNorm, rotary positions, GQA and a SiLU-gated MLP."""

    # The module tree under ``model.`` (built as ``model_cls(ctx, arch)``); Gemma swaps it.
    model_cls: ClassVar[type[nn.Module]] = LlamaModel
    model: Any  # a model_cls instance
    # Built from ctx.parallel's slices (kvik.layers.parallel_linear / vocab_parallel) and split into
    # pipeline stages by forward(). Read from each class's own namespace, never inherited (a subclass
    # may build its own modules): subclasses that reuse these layers unchanged declare them again.
    supports_tensor_parallel: ClassVar[bool] = True
    supports_pipeline_parallel: ClassVar[bool] = True
    # A single device unless __init__ sets this rank's state (subclasses that build their own
    # modules without calling it stay single-device).
    parallel: ParallelState = ParallelState()

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        self.dtype = ctx.dtype
        self.hidden_size = int(cfg.hidden_size)
        self.parallel = ctx.parallel
        self.model = self.model_cls(ctx, type(self))
        tie = self.model.embed_tokens if getattr(cfg, "tie_word_embeddings", False) else None
        self.lm_head = lm_head(ctx, cfg.vocab_size, cfg.hidden_size, tie) if ctx.parallel.is_last_stage else None
        self._loaded: set[str] = set()

    # -- architecture hooks (subclasses override) ---------------------------
    @classmethod
    def make_attention_layer(cls, ctx: ModelBuildContext, index: int) -> nn.Module:
        """Layer ``index``'s attention block (called as ``(hidden, cos_sin, rotary, kv_cache, metadata)``)."""
        cfg = ctx.model_config.hf_config
        return LlamaAttention(ctx, cls.qkv_bias(cfg), cls.o_bias(cfg), cls.layer_sliding_window(cfg, index))

    @classmethod
    def make_mlp(cls, ctx: ModelBuildContext, index: int) -> nn.Module:
        """Layer ``index``'s feed-forward block (a dense MLP here; MoE architectures differ)."""
        return LlamaMLP(ctx, bool(getattr(ctx.model_config.hf_config, "mlp_bias", False)))

    @classmethod
    def qkv_bias(cls, cfg: Any) -> bool:
        return bool(getattr(cfg, "attention_bias", False))

    @classmethod
    def o_bias(cls, cfg: Any) -> bool:
        return bool(getattr(cfg, "attention_bias", False))

    @classmethod
    def layer_sliding_window(cls, cfg: Any, index: int) -> int | None:
        """The window of layer ``index`` (None: full attention)."""
        return layer_types_window(cfg, index)

    # -- running --------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        p = self.parallel
        residual: torch.Tensor | None = None
        if p.is_first_stage:
            hidden = self.model.embed_tokens(input_ids)
        else:  # the previous stage's output: hidden and residual, [num_tokens, hidden] each
            shape = (input_ids.shape[0], self.hidden_size)
            hidden, residual = p.recv_prev([shape, shape], self.dtype, input_ids.device)
        rotary = self.model.rotary_emb
        cos_sin = rotary.cos_sin(positions, hidden.dtype)  # computed once, used by every layer
        # kv_caches holds this stage's layers only (one per attention layer built).
        layers = self.model.layers[getattr(self.model, "start", 0) : getattr(self.model, "end", None)]
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos_sin, rotary, kv_cache, metadata)
        if not p.is_last_stage:
            assert residual is not None  # every stage has at least one layer
            p.send_next([hidden, residual])
            return hidden  # not sampled from: the runner samples on the last stage only
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def holds_weight(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to this pipeline stage (others are skipped unread)."""
        if self.parallel.pp_size == 1:
            return True
        if name.startswith("model.layers."):
            return self.model.start <= int(name.split(".")[2]) < self.model.end
        owner = {"model.embed_tokens.": self.model.embed_tokens, "model.norm.": self.model.norm, "lm_head.": self.lm_head}
        return next((module is not None for prefix, module in owner.items() if name.startswith(prefix)), True)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [n, vocab] float32


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with an optional sliding window on every layer."""

    supports_tensor_parallel = True  # the Llama layers, unchanged (declared per class: not inherited)
    supports_pipeline_parallel = True

    @classmethod
    def layer_sliding_window(cls, cfg: Any, index: int) -> int | None:
        if getattr(cfg, "layer_types", None) is not None:
            return super().layer_sliding_window(cfg, index)
        window = getattr(cfg, "sliding_window", None)
        return int(window) if window else None


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v biases; layers from ``max_window_layers`` on may slide."""

    supports_tensor_parallel = True  # the Llama layers, unchanged (declared per class: not inherited)
    supports_pipeline_parallel = True

    @classmethod
    def qkv_bias(cls, cfg: Any) -> bool:
        return True

    @classmethod
    def o_bias(cls, cfg: Any) -> bool:
        return False

    @classmethod
    def layer_sliding_window(cls, cfg: Any, index: int) -> int | None:
        if not getattr(cfg, "use_sliding_window", False):
            return None
        if getattr(cfg, "layer_types", None) is not None:
            return super().layer_sliding_window(cfg, index)
        window = getattr(cfg, "sliding_window", None)
        if window and index >= getattr(cfg, "max_window_layers", 0):
            return int(window)
        return None
