"""Attention over the paged KV cache: the backend interface and its metadata."""

from kvik.attention.backend import AttentionBackend, AttentionMetadata, RotaryInputs

__all__ = ["AttentionBackend", "AttentionMetadata", "RotaryInputs"]
