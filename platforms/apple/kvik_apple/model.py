"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in mlx.nn over a flattened step batch.

Module and parameter names mirror Hugging Face's, so checkpoint weights load
by name. Every forward works on the flattened batch of the step: ``[num_tokens, ...]``
rows from all scheduled requests, with per-token positions; attention goes
through the paged backend, which knows the request boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from kvik.attention.backend import AttentionMetadata

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(slots=True)
class LlamaArgs:
    """The config facts the MLX model needs; read from any Llama-family HF config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None

    @classmethod
    def from_hf(cls, hf: Any, architecture: str) -> LlamaArgs:
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"the apple (MLX) platform cannot run architecture {architecture!r}; "
                f"it runs {', '.join(SUPPORTED_ARCHITECTURES)} (use --device cpu for other models)"
            )
        heads = hf.num_attention_heads
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        attention_bias = bool(getattr(hf, "attention_bias", False))
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        return cls(
            architecture=architecture,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,  # Qwen2 always has q/k/v biases
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            rope_theta=float(theta),
            rope_scaling=rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None,
        )


def rope_wavelengths(args: LlamaArgs) -> mx.array:
    """[head_dim // 2] float32: 1 / inv_freq per rotary pair, with HF's rope scaling applied."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = args.rope_scaling
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif kind == "llama3":
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_len = float(scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv_freq
            smooth = (old_len / wavelen - low) / (high - low)
            scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
            mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
            inv_freq = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
        else:
            raise ValueError(
                f"rope scaling type {kind!r} is not supported by the apple (MLX) platform; "
                "supported: default, linear, llama3"
            )
    return mx.array((1.0 / inv_freq).astype(np.float32))


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, backend: Any) -> None:
        super().__init__()
        h, hd = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, hd
        self.q_proj = nn.Linear(h, args.num_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * hd, h, bias=args.o_bias)
        self.backend = backend  # MLXPagedAttentionBackend (not a parameter)
        self._wavelengths = rope_wavelengths(args)  # leading "_": not a parameter

    def _rope(self, x: mx.array, positions: mx.array) -> mx.array:
        # x: [T, heads, D] -> rope treats each token as its own batch row so
        # every row gets its own position offset.
        t, heads, d = x.shape
        out = mx.fast.rope(
            x.reshape(t, heads, 1, d),
            d,
            traditional=False,
            base=None,
            scale=1.0,
            offset=positions,
            freqs=self._wavelengths,
        )
        return out.reshape(t, heads, d)

    def __call__(self, x: mx.array, positions: mx.array, kv_cache: mx.array, metadata: AttentionMetadata) -> mx.array:
        t = x.shape[0]
        q = self._rope(self.q_proj(x).reshape(t, self.num_heads, self.head_dim), positions)
        k = self._rope(self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim), positions)
        v = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_cache, metadata)  # [T, heads, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, backend: Any) -> None:
        super().__init__()
        self.self_attn = Attention(args, backend)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, positions: mx.array, kv_cache: mx.array, metadata: AttentionMetadata) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, metadata)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, backend: Any) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, backend) for _ in range(args.num_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class MLXCausalLM(nn.Module):
    """The whole model: ``__call__`` returns final hidden states, ``compute_logits`` the vocab scores."""

    def __init__(self, args: LlamaArgs, backend: Any) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args, backend)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        input_ids: mx.array,  # [T] int32
        positions: mx.array,  # [T] int32
        kv_caches: list[mx.array],  # one per layer, MLXPagedAttentionBackend.kv_cache_shape
        metadata: AttentionMetadata,
    ) -> mx.array:  # [T, hidden]
        x = self.model.embed_tokens(input_ids)
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, positions, cache, metadata)
        return self.model.norm(x)

    def compute_logits(self, hidden: mx.array) -> mx.array:
        """[n, hidden] -> [n, vocab] float32."""
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(mx.float32)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop names HF checkpoints carry that this model derives (rotary tables, a tied head)."""
        drop = ("rotary_emb.inv_freq",)
        out = {k: v for k, v in weights.items() if not k.endswith(drop)}
        if self.args.tie_word_embeddings:
            out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
        return out
