"""ModernBERT: a pre-LayerNorm rotary encoder with alternating global and local attention.

Like the BERT family (:mod:`kvik.models.bert`) it is bidirectional, runs each
request whole in one step and keeps no KV cache. Per layer: ``attn_norm``
(none on layer 0) -> fused ``Wqkv`` -> rotary (``rope_theta`` of the layer's
type: ``full_attention`` or ``sliding_attention``) -> attention (a local layer
sees keys at most ``sliding_window`` positions away, either side) -> ``Wo``;
then ``mlp_norm`` -> GeGLU (``Wi`` gives input | gate) -> ``Wo``; a final norm.

* ``ModernBertModel``: the body (ModernBERT-based sentence-transformers embedders).
* ``ModernBertForSequenceClassification``: ``classifier(norm(act(head.dense(pooled))))`` on the CLS
  state or the mean (the config's ``classifier_pooling``), run as ``pooler_head`` in float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvik.attention.backend import AttentionMetadata
from kvik.layers.bidirectional import EncoderAttention
from kvik.models.bert import _ACTIVATIONS, _linear, _num_labels
from kvik.models.interface import ModelBuildContext


def _layer_types(cfg: Any) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    every = int(getattr(cfg, "global_attn_every_n_layers", 3) or 3)  # older configs
    return ["full_attention" if i % every == 0 else "sliding_attention" for i in range(int(cfg.num_hidden_layers))]


def _theta(cfg: Any, layer_type: str) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get(layer_type):
        return float(params[layer_type]["rope_theta"])
    name = "global_rope_theta" if layer_type == "full_attention" else "local_rope_theta"
    return float(getattr(cfg, name, 160000.0 if layer_type == "full_attention" else 10000.0))


def _norm(cfg: Any, dtype: torch.dtype, device: torch.device) -> nn.LayerNorm:
    return nn.LayerNorm(int(cfg.hidden_size), eps=float(cfg.norm_eps), bias=bool(cfg.norm_bias), dtype=dtype, device=device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on [T, H, D] with cos/sin [T, 1, D] (the half-split layout: pairs (i, i + D/2))."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class _Attention(nn.Module):
    def __init__(self, cfg: Any, window: int | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, bias = int(cfg.hidden_size), bool(cfg.attention_bias)
        self.num_heads = int(cfg.num_attention_heads)
        self.head_dim = hidden // self.num_heads
        self.window = window
        self.Wqkv = nn.Linear(hidden, 3 * hidden, bias=bias, dtype=dtype, device=device)
        self.Wo = nn.Linear(hidden, hidden, bias=bias, dtype=dtype, device=device)
        self.attn = EncoderAttention(self.num_heads, self.head_dim, self.head_dim**-0.5, window)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], metadata: AttentionMetadata[torch.Tensor]
    ) -> torch.Tensor:
        qkv = self.Wqkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)
        q, k = _rotate(qkv[:, 0], *cos_sin), _rotate(qkv[:, 1], *cos_sin)
        out = self.attn.packed_rows(x)  # the piecewise graphs' buffer (no copy), or None
        packed = torch.stack((q, k, qkv[:, 2]), dim=1, out=None if out is None else out.view(qkv.shape))
        return self.Wo(self.attn(packed.view(x.shape[0], -1), metadata))  # type: ignore[no-any-return]


class _MLP(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, inter, bias = int(cfg.hidden_size), int(cfg.intermediate_size), bool(cfg.mlp_bias)
        self.act = _ACTIVATIONS[str(cfg.hidden_activation)]
        self.Wi = nn.Linear(hidden, 2 * inter, bias=bias, dtype=dtype, device=device)
        self.Wo = nn.Linear(inter, hidden, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(value) * gate)


class _Layer(nn.Module):
    def __init__(self, cfg: Any, index: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.kind = _layer_types(cfg)[index]
        window = int(cfg.sliding_window) if self.kind == "sliding_attention" else None
        self.attn_norm = _norm(cfg, dtype, device) if index else None  # layer 0 reads the normed embeddings
        self.attn = _Attention(cfg, window, dtype, device)
        self.mlp_norm = _norm(cfg, dtype, device)
        self.mlp = _MLP(cfg, dtype, device)

    def forward(
        self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], metadata: AttentionMetadata[torch.Tensor]
    ) -> torch.Tensor:
        h = h + self.attn(h if self.attn_norm is None else self.attn_norm(h), cos_sin, metadata)
        return h + self.mlp(self.mlp_norm(h))


class _Embeddings(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(int(cfg.vocab_size), int(cfg.hidden_size), dtype=dtype, device=device)
        self.norm = _norm(cfg, dtype, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class _Body(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg, dtype, device)
        self.layers = nn.ModuleList(_Layer(cfg, i, dtype, device) for i in range(int(cfg.num_hidden_layers)))
        self.final_norm = _norm(cfg, dtype, device)
        head_dim = int(cfg.hidden_size) // int(cfg.num_attention_heads)
        for kind in set(_layer_types(cfg)):  # float32 inverse frequencies per layer type
            inv = 1.0 / (_theta(cfg, kind) ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
            self.register_buffer(f"inv_freq_{kind}", inv, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata[torch.Tensor]) -> torch.Tensor:
        h = self.embeddings(input_ids)
        cos_sin = {}
        for kind in {layer.kind for layer in self.layers}:
            freqs = positions.float()[:, None] * getattr(self, f"inv_freq_{kind}")[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
            cos_sin[kind] = (angles.cos().to(h.dtype), angles.sin().to(h.dtype))
        for layer in self.layers:
            h = layer(h, cos_sin[layer.kind], metadata)
        return self.final_norm(h)


class ModernBertModel(nn.Module):
    """The ModernBERT body; checkpoint names as ``AutoModel.save_pretrained`` writes them."""

    is_pooling_model = True
    prefix = ""  # where the body sits in the checkpoint

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        act = str(cfg.hidden_activation)
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation={act!r} is not supported by kvik's ModernBERT; it runs {sorted(_ACTIVATIONS)}")
        self.body = _Body(cfg, ctx.dtype, ctx.device)
        self._loaded: set[str] = set()

    @classmethod
    def layer_sliding_window(cls, cfg: Any, index: int) -> int | None:
        """None: local attention lives inside the encoder, not in a paged KV cache (there is none)."""
        return None

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64: 0..n-1 within each request (whole prompts)
        kv_caches: list[torch.Tensor],  # unused: no cache
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:  # [T, hidden]
        return self.body(input_ids, positions, metadata)  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores against the token embeddings (tied); asked for only in the runner's profiling step."""
        return hidden.float() @ self.body.embeddings.tok_embeddings.weight.float().t()

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        params = dict(self.named_parameters())
        consumed: set[str] = set()
        unknown: list[str] = []
        for original, value in weights:
            name = f"body.{original.removeprefix(self.prefix)}" if original.startswith(self.prefix) else original
            target = params.get(name)
            if target is None:
                unknown.append(original)
                continue
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {original} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.data.copy_(value.to(target.dtype))
            self._loaded.add(name)
            consumed.add(original)
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            raise ValueError(f"checkpoint has weights {type(self).__name__} does not know: {shown}")
        return consumed

    def missing_weights(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if name not in self._loaded]


class _ClassifierHead(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden = int(cfg.hidden_size)
        self.dense = nn.Linear(hidden, hidden, bias=bool(cfg.classifier_bias), dtype=dtype, device=device)
        self.norm = _norm(cfg, dtype, device)
        self.act = _ACTIVATIONS[str(cfg.classifier_activation)]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # float32 throughout
        h = self.act(_linear(pooled, self.dense))
        bias = None if self.norm.bias is None else self.norm.bias.float()
        return F.layer_norm(h, h.shape[-1:], self.norm.weight.float(), bias, self.norm.eps)


class ModernBertForSequenceClassification(ModernBertModel):
    """ModernBERT cross-encoder / classifier (``model.*`` body, ``head``, ``classifier``)."""

    prefix = "model."

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__(ctx)
        cfg = ctx.model_config.hf_config
        self.head = _ClassifierHead(cfg, ctx.dtype, ctx.device)
        self.classifier = nn.Linear(int(cfg.hidden_size), _num_labels(cfg), dtype=ctx.dtype, device=ctx.device)

    def pooler_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """[P, hidden] float32 pooled states (CLS or mean) -> [P, num_labels] logits."""
        return _linear(self.head(pooled), self.classifier)
