"""kvik's Triton attention backend (registered as ``"triton"``)."""

from __future__ import annotations

__all__ = ["TritonAttentionBackend"]


def __getattr__(name: str) -> object:
    # Lazy: importing the package must not import triton (plugin discovery does this).
    if name == "TritonAttentionBackend":
        from kvik_triton_attention.backend import TritonAttentionBackend

        return TritonAttentionBackend
    raise AttributeError(name)
