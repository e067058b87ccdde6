"""What a model architecture plugin provides, and what it is given to build itself."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.config import ModelConfig
from kvik.distributed.parallel_state import ParallelState
from kvik.quantization.base import QuantizationMethod


@dataclass(slots=True)
class ModelBuildContext:
    """Everything an architecture needs from the engine to build its modules."""

    model_config: ModelConfig
    dtype: torch.dtype
    device: torch.device
    # make_attention(num_heads, head_size, num_kv_heads, scale, sliding_window) -> backend
    make_attention: Callable[..., AttentionBackend]
    quant_method: QuantizationMethod | None = None  # None: dense weights
    # This rank's place in a tensor/pipeline-parallel layout (single device by default). Models that
    # honour it set ``supports_tensor_parallel`` / ``supports_pipeline_parallel`` (docs/distributed.md).
    parallel: ParallelState = field(default_factory=ParallelState)


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only model over kvik's paged KV cache (an ``nn.Module``).

    ``__init__(ctx: ModelBuildContext)`` builds modules on ``ctx.device``.
    """

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],  # one per layer, AttentionBackend.kv_cache_shape
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        """Run all layers over the flattened step batch, reading and writing the cache."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size] float32 logits."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Load Hugging Face-named weights; return the names consumed.

        Unknown names are an error; names the architecture deliberately drops
        (``rotary_emb.inv_freq``, a tied ``lm_head``) are consumed silently.
        """
        ...
