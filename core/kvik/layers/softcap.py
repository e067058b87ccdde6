"""Logit soft-capping: ``cap * tanh(x / cap)`` (Gemma 2's final logits; its attention scores
are capped inside the attention backend, see ``AttentionBackend.supports_logits_soft_cap``)."""

from __future__ import annotations

import torch


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Squash ``x`` smoothly into ``(-cap, cap)``; unchanged when ``cap`` is None or 0."""
    if not cap:
        return x
    return torch.tanh(x / cap) * cap
