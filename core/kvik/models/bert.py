"""BERT-family encoders: BERT, RoBERTa and XLM-RoBERTa embedders and cross-encoders.

Post-LayerNorm transformer encoders with learned absolute positions and token
types. Attention is bidirectional (:mod:`kvik.layers.bidirectional`): each
request runs whole in one step and no paged KV cache is built (the model makes
no attention backend, so the runner keeps no cache for it).

* ``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel``: the body, as
  ``AutoModel.save_pretrained`` (and sentence-transformers) write it; the
  runner pools its hidden states (CLS, mean or last token).
* ``BertForSequenceClassification``: BERT's ``pooler`` (dense + tanh on the CLS
  state) and ``classifier``; ``(XLM)RobertaForSequenceClassification``: the
  ``classifier.dense`` + tanh + ``classifier.out_proj`` head on the CLS state.
  Cross-encoder rerankers are these; the head runs as ``pooler_head`` in float32.

Positions: BERT's are ``0..n-1``; (XLM-)RoBERTa's count non-padding tokens
from ``pad_token_id + 1`` (a padding token gets ``pad_token_id``), as transformers
computes them. Token types: with ``type_vocab_size >= 2`` (BERT) the tokens after
a request's first ``[SEP]`` are segment 1, which is what the tokenizer's text-pair
encoding ``[CLS] a [SEP] b [SEP]`` writes (how ``score`` / ``/rerank`` feed pairs).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvik.attention.backend import AttentionMetadata
from kvik.layers.bidirectional import EncoderAttention
from kvik.layers.norm import AddLayerNorm
from kvik.models.interface import ModelBuildContext
from kvik.pooling.architectures import position_offset

logger = logging.getLogger(__name__)

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
# Checkpoint tensors the encoder does not use: index buffers, and (for embedders) BERT's pooler,
# which sentence-transformers never applies.
_IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$")
_QKV = re.compile(r"^(encoder\.layer\.\d+\.attention)\.self\.(query|key|value)\.(weight|bias)$")


def _sep_token_id(ctx: ModelBuildContext) -> int | None:
    """The ``[SEP]`` id that starts segment 1: from the config, else from the checkpoint's tokenizer."""
    hf = ctx.model_config.hf_config
    value = getattr(hf, "sep_token_id", None)
    if value is not None:
        return int(value)
    path = getattr(ctx.model_config.source, "path", None)
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        sep = AutoTokenizer.from_pretrained(str(path)).sep_token_id
    except (OSError, ValueError):
        sep = None
    if sep is None:  # every token is segment 0: right for single texts, not for a cross-encoder's pairs
        logger.warning("%s: no [SEP] token id in the config or a tokenizer next to the weights; text pairs "
                       "will be read as one segment (token type 0)", path)  # fmt: skip
        return None
    return int(sep)


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's post-LN sublayer output."""

    def __init__(self, fan_in: int, hidden: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dense = nn.Linear(fan_in, hidden, dtype=dtype, device=device)
        self.LayerNorm = AddLayerNorm(hidden, eps=eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x), residual)  # type: ignore[no-any-return]


class _Attention(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.num_heads
        hidden = int(cfg.hidden_size)
        self.qkv = nn.Linear(hidden, 3 * hidden, dtype=dtype, device=device)  # query | key | value, one GEMM
        self.attn = EncoderAttention(self.num_heads, self.head_dim, self.head_dim**-0.5)
        self.output = _DenseNorm(hidden, hidden, float(cfg.layer_norm_eps), dtype, device)

    def forward(self, x: torch.Tensor, metadata: AttentionMetadata[torch.Tensor]) -> torch.Tensor:
        return self.output(self.attn(self.attn.project(x, self.qkv), metadata), x)  # type: ignore[no-any-return]


class _Intermediate(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        act = str(cfg.hidden_act)
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r} is not supported by kvik's BERT encoder; it runs {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[act]
        self.dense = nn.Linear(int(cfg.hidden_size), int(cfg.intermediate_size), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.attention = _Attention(cfg, dtype, device)
        self.intermediate = _Intermediate(cfg, dtype, device)
        self.output = _DenseNorm(int(cfg.intermediate_size), int(cfg.hidden_size), float(cfg.layer_norm_eps), dtype, device)

    def forward(self, x: torch.Tensor, metadata: AttentionMetadata[torch.Tensor]) -> torch.Tensor:
        h = self.attention(x, metadata)
        return self.output(self.intermediate(h), h)  # type: ignore[no-any-return]


class _Stack(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg, dtype, device) for _ in range(int(cfg.num_hidden_layers)))

    def forward(self, h: torch.Tensor, metadata: AttentionMetadata[torch.Tensor]) -> torch.Tensor:
        for layer in self.layer:
            h = layer(h, metadata)
        return h


class _Head(nn.Module):
    """``dense`` (+ tanh) and, for RoBERTa's head, ``out_proj``: the classification layers, run in float32."""

    def __init__(self, hidden: int, num_labels: int | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, dtype=dtype, device=device)
        self.out_proj = None if num_labels is None else nn.Linear(hidden, num_labels, dtype=dtype, device=device)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(_linear(pooled, self.dense))
        return h if self.out_proj is None else _linear(h, self.out_proj)


class _Embeddings(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden = int(cfg.hidden_size)
        kw = dict(dtype=dtype, device=device)
        self.word_embeddings = nn.Embedding(int(cfg.vocab_size), hidden, **kw)  # type: ignore[arg-type]
        self.position_embeddings = nn.Embedding(int(cfg.max_position_embeddings), hidden, **kw)  # type: ignore[arg-type]
        self.token_type_embeddings = nn.Embedding(max(1, int(cfg.type_vocab_size)), hidden, **kw)  # type: ignore[arg-type]
        self.LayerNorm = nn.LayerNorm(hidden, eps=float(cfg.layer_norm_eps), **kw)  # type: ignore[arg-type]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(input_ids) + self.token_type_embeddings(types) + self.position_embeddings(positions)
        return self.LayerNorm(h)


class _Encoder(nn.Module):
    """The encoder body; subclasses name the checkpoint prefix and add a classification head."""

    is_pooling_model = True
    prefix = "bert"  # the body's name inside a *ForSequenceClassification checkpoint

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__()
        cfg = ctx.model_config.hf_config
        kind = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise ValueError(f"position_embedding_type={kind!r} is not supported; kvik's BERT runs 'absolute' positions")
        self.embeddings = _Embeddings(cfg, ctx.dtype, ctx.device)
        self.encoder = _Stack(cfg, ctx.dtype, ctx.device)
        self.pad_token_id = int(getattr(cfg, "pad_token_id", 0) or 0)
        self.position_offset = position_offset(cfg)
        self.sep_token_id = _sep_token_id(ctx) if int(cfg.type_vocab_size) >= 2 else None
        self._loaded: set[str] = set()

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64: 0..n-1 within each request (whole prompts)
        kv_caches: list[torch.Tensor],  # unused: the encoder keeps no cache
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:  # [T, hidden]
        # Positions and token types from device tensors alone: the forward up to the first attention call
        # must replay as a CUDA graph over any step of its size (see kvik.layers.bidirectional).
        h = self.embeddings(input_ids, self._positions(input_ids, positions), self._token_types(input_ids, positions))
        return self.encoder(h, metadata)  # type: ignore[no-any-return]

    @staticmethod
    def _count_before(flags: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[T] int64: per row, how many rows of its own request before it have ``flags`` set.

        A request's rows count their positions from 0 (whole prompts), so row ``i`` of the step starts its
        request at ``i - positions[i]`` (a padding row, at position 0, is a request of its own)."""
        flags = flags.long()
        seen = torch.cumsum(flags, 0) - flags  # exclusive, over the whole step
        first = torch.arange(flags.shape[0], device=flags.device) - positions
        return seen - seen[first]

    def _positions(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.position_offset:
            return positions
        # transformers: non-padding tokens count from pad_token_id + 1, padding tokens sit at pad_token_id
        # (with no padding token in a prompt, that is ``positions + pad_token_id + 1``).
        is_token = input_ids != self.pad_token_id
        counted = self._count_before(is_token, positions) + 1 + self.pad_token_id
        return torch.where(is_token, counted, self.pad_token_id)

    def _token_types(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.sep_token_id is None:
            return torch.zeros_like(input_ids)
        return self._count_before(input_ids == self.sep_token_id, positions).clamp(max=1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores against the word embeddings (tied, as BERT's MLM decoder is). Pooling requests never
        sample; the runner asks for logits only in its start-up profiling step."""
        return hidden.float() @ self.embeddings.word_embeddings.weight.float().t()

    # -- weights --------------------------------------------------------------------------------
    @classmethod
    def sanitize(cls, name: str) -> str | None:
        """A checkpoint name -> our parameter name; None for a tensor the model does not use."""
        name = name.removeprefix(f"{cls.prefix}.")
        if _IGNORED.search(name) or name.startswith("pooler."):
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        params = dict(self.named_parameters())
        consumed: set[str] = set()
        unknown: list[str] = []
        for original, value in weights:
            name = self.sanitize(original)
            if name is None:
                consumed.add(original)
                continue
            shard = None
            qkv = _QKV.match(name)
            if qkv is not None:
                shard = ("query", "key", "value").index(qkv[2])
                name = f"{qkv[1]}.qkv.{qkv[3]}"
            target = params.get(name)
            if target is None:
                unknown.append(original)
                continue
            data = target.data
            if shard is not None:
                size = data.shape[0] // 3
                data = data[shard * size : (shard + 1) * size]
            if tuple(value.shape) != tuple(data.shape):
                raise ValueError(f"checkpoint tensor {original} has shape {tuple(value.shape)}, expected {tuple(data.shape)}")
            data.copy_(value.to(data.dtype))
            self._loaded.add(name if shard is None else f"{name}[{shard}]")
            consumed.add(original)
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            raise ValueError(f"checkpoint has weights {type(self).__name__} does not know: {shown}")
        return consumed

    def missing_weights(self) -> list[str]:
        missing: list[str] = []
        for name, _ in self.named_parameters():
            wanted = [f"{name}[{i}]" for i in range(3)] if ".qkv." in name else [name]
            missing.extend(w for w in wanted if w not in self._loaded)
        return missing


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A head layer in float32 (the pooled rows are float32)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _num_labels(cfg: Any) -> int:
    return int(getattr(cfg, "num_labels", None) or len(getattr(cfg, "id2label", None) or {}) or 2)


class BertModel(_Encoder):
    """The BERT body (all-MiniLM, bge, e5 style embedders)."""

    prefix = "bert"


class RobertaModel(_Encoder):
    """The RoBERTa body (positions offset by ``pad_token_id + 1``)."""

    prefix = "roberta"


class XLMRobertaModel(RobertaModel):
    """The XLM-RoBERTa body (multilingual-e5, bge-m3 style embedders)."""


class BertForSequenceClassification(_Encoder):
    """BERT cross-encoder / classifier: ``classifier(tanh(pooler.dense(cls)))``."""

    prefix = "bert"

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__(ctx)
        cfg = ctx.model_config.hf_config
        hidden = int(cfg.hidden_size)
        self.pooler = _Head(hidden, None, ctx.dtype, ctx.device)
        self.classifier = nn.Linear(hidden, _num_labels(cfg), dtype=ctx.dtype, device=ctx.device)

    @classmethod
    def sanitize(cls, name: str) -> str | None:
        name = name.removeprefix(f"{cls.prefix}.")
        return None if _IGNORED.search(name) else name

    def pooler_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """[P, hidden] float32 CLS states -> [P, num_labels] logits."""
        return _linear(self.pooler(pooled), self.classifier)


class RobertaForSequenceClassification(_Encoder):
    """(XLM-)RoBERTa cross-encoder / classifier: ``out_proj(tanh(dense(cls)))``."""

    prefix = "roberta"

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__(ctx)
        cfg = ctx.model_config.hf_config
        hidden = int(cfg.hidden_size)
        self.classifier = _Head(hidden, _num_labels(cfg), ctx.dtype, ctx.device)

    def pooler_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """[P, hidden] float32 CLS states -> [P, num_labels] logits."""
        return self.classifier(pooled)


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    """The XLM-RoBERTa cross-encoder (bge-reranker style)."""
