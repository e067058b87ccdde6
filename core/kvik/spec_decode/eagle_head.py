"""EAGLE and EAGLE-3 draft heads, loaded from their published checkpoint layouts.

EAGLE (``yuhuili/EAGLE-*``): ``fc`` maps ``concat(embed(token), feature)`` (2H -> H, with a
bias in most checkpoints) into ``layers.{i}`` Llama decoder layers, whose layer 0 has no
``input_layernorm``; the output goes to the *target's* ``lm_head`` without a final norm.
The feature of row ``j`` is the target's final (normed) hidden state at position ``j``
and the token is the one at ``j + 1``; a drafting step feeds the head's own output back.

EAGLE-3 (``yuhuili/EAGLE3-*``): ``fc`` maps three target hidden states (the residual
stream entering layers ``low, mid, high``: 3H_target -> H); one ``midlayer`` attends over
``concat(input_layernorm(embed(token)), hidden_norm(feature))`` (2H wide q/k/v inputs),
then ``norm`` and its own ``lm_head`` over a draft vocabulary whose ids map to the
target's through ``d2t`` (target id = draft id + d2t[draft id]). Drafting steps feed the
head's own (pre-norm, H-wide) output back, bypassing ``fc``.

Both share the target's token embedding when the checkpoint has no ``embed_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.layers.norm import RMSNorm
from kvik.layers.rope_settings import rope_settings
from kvik.layers.rotary import RotaryEmbedding


@dataclass(frozen=True, slots=True)
class HeadConfig:
    kind: str  # "eagle" | "eagle3"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    vocab_size: int  # the embedding's (the target's)
    draft_vocab_size: int  # EAGLE-3's lm_head rows (== vocab_size for EAGLE)
    target_hidden_size: int
    aux_layers: tuple[int, ...]  # EAGLE-3: target layers whose input residual stream is a feature
    attention_bias: bool
    hf: Any  # a transformers LlamaConfig (rope settings)


def read_head_config(path: Path, kind: str, target_layers: int) -> HeadConfig:
    from transformers import LlamaConfig

    raw = json.loads((path / "config.json").read_text())
    hf = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    L = target_layers
    aux = raw.get("eagle_aux_hidden_state_layer_ids") or (
        raw.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids") or (2, L // 2, L - 3)
    )
    return HeadConfig(
        kind=kind,
        hidden_size=hidden,
        num_layers=int(raw.get("num_hidden_layers", 1)),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        intermediate_size=int(raw["intermediate_size"]),
        eps=float(raw.get("rms_norm_eps", 1e-6)),
        vocab_size=int(raw["vocab_size"]),
        draft_vocab_size=int(raw.get("draft_vocab_size") or raw["vocab_size"]),
        target_hidden_size=int(raw.get("target_hidden_size") or hidden),
        aux_layers=tuple(int(i) for i in aux),
        attention_bias=bool(raw.get("attention_bias", False)),
        hf=hf,
    )


def read_head_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the head checkpoint (safetensors or pytorch_model.bin), names without a ``model.`` prefix."""
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        for f in files:
            tensors.update(load_file(str(f)))
    else:
        for f in sorted(path.glob("pytorch_model*.bin")):
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    if not tensors:
        raise ValueError(f"speculative_config: no *.safetensors or pytorch_model*.bin weights in {path}")
    return {k.removeprefix("model."): v for k, v in tensors.items()}


class HeadLayer(nn.Module):
    """One Llama decoder layer; EAGLE-3's takes ``concat(embedding, feature)`` as its attention input."""

    def __init__(self, cfg: HeadConfig, index: int, attn: AttentionBackend[torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        in_dim = 2 * h if cfg.kind == "eagle3" else h
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(in_dim, cfg.num_heads * hd, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(in_dim, cfg.num_kv_heads * hd, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(in_dim, cfg.num_kv_heads * hd, bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(cfg.num_heads * hd, h, bias=bias, dtype=dtype)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False, dtype=dtype)
        # EAGLE's layer 0 skips its input norm; EAGLE-3 norms the embedding and the feature separately.
        self.input_layernorm = RMSNorm(h, cfg.eps, dtype) if cfg.kind == "eagle3" or index > 0 else None
        self.hidden_norm = RMSNorm(h, cfg.eps, dtype) if cfg.kind == "eagle3" else None
        self.post_attention_layernorm = RMSNorm(h, cfg.eps, dtype)
        self.attn = attn
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd

    def forward(
        self,
        x: torch.Tensor,  # [n, H] the residual stream
        emb: torch.Tensor | None,  # [n, H] EAGLE-3's token embeddings
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:
        n = x.shape[0]
        if self.hidden_norm is not None:
            assert emb is not None and self.input_layernorm is not None
            h = torch.cat([self.input_layernorm(emb), self.hidden_norm(x)], dim=-1)  # type: ignore[list-item]
        else:
            h = x if self.input_layernorm is None else self.input_layernorm(x)  # type: ignore[assignment]
        q = self.q_proj(h).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(h).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k, cos_sin)
        x = x + self.o_proj(self.attn.forward(q, k, v, kv_cache, metadata).reshape(n, -1))
        m = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))  # type: ignore[arg-type]


class EagleHead(nn.Module):
    """The head's modules; :meth:`forward` returns its hidden states, :meth:`logits` the target-vocab logits."""

    def __init__(
        self, cfg: HeadConfig, attns: list[AttentionBackend[torch.Tensor]], dtype: torch.dtype, max_len: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        fc_in = 3 * cfg.target_hidden_size if cfg.kind == "eagle3" else 2 * h
        self.fc = nn.Linear(fc_in, h, bias=cfg.kind == "eagle", dtype=dtype)
        self.layers = nn.ModuleList(HeadLayer(cfg, i, attns[i], dtype) for i in range(len(attns)))
        self.norm = RMSNorm(h, cfg.eps, dtype) if cfg.kind == "eagle3" else None
        self.lm_head: nn.Linear | None = None
        self.embed_tokens: nn.Embedding | None = None
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64), persistent=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, rope_settings(cfg.hf), int(cfg.hf.max_position_embeddings), max_len)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the checkpoint's tensors in; ValueError naming missing or misshaped ones."""
        tensors = dict(tensors)
        prefix = "midlayer." if self.cfg.kind == "eagle3" else "layers."
        renamed: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            key = name
            if name.startswith("midlayer."):
                key = "layers.0." + name.removeprefix("midlayer.")
            renamed[key.replace(".self_attn.", ".").replace(".mlp.", ".")] = t
        if "fc.bias" not in renamed and self.fc.bias is not None:
            self.fc.bias = None  # type: ignore[assignment]  # EAGLE checkpoints trained without it
        if "embed_tokens.weight" in renamed:
            w = renamed["embed_tokens.weight"]
            self.embed_tokens = nn.Embedding(w.shape[0], w.shape[1], dtype=self.fc.weight.dtype)
        if "lm_head.weight" in renamed:
            w = renamed["lm_head.weight"]
            self.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=self.fc.weight.dtype)
        if "d2t" in renamed:
            self.d2t = renamed.pop("d2t").to(torch.int64)
        renamed.pop("t2d", None)
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(renamed))
        if missing:
            raise ValueError(
                f"speculative_config: the {self.cfg.kind} head lacks tensors {missing[:4]} ({prefix}* layout)"
            )
        for name, param in own.items():
            value = renamed[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"speculative_config: head tensor {name} has shape {tuple(value.shape)}, "
                    f"the target needs {tuple(param.shape)}"
                )
            param.data.copy_(value.to(param.dtype))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(
        self,
        emb: torch.Tensor,  # [n, H] token embeddings
        features: torch.Tensor,  # [n, F]: target features (fc applies) or the head's own output [n, H]
        positions: torch.Tensor,  # [n]
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:  # [n, H]
        if self.cfg.kind == "eagle3":
            x = self.fc(features) if features.shape[-1] != self.cfg.hidden_size else features
        else:
            x = self.fc(torch.cat([emb, features], dim=-1))
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, emb, cos_sin, self.rotary, cache, metadata)
        return x
