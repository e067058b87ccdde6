"""Test-only variants of the triton backend (never registered as plugins).

:class:`InterpretedTritonAttentionBackend` also accepts CPU tensors: under
``TRITON_INTERPRET=1`` Triton runs the same kernels in numpy, which is how CI
checks them without a GPU. It is far too slow for real use, which is why the
real backend declares only ``"cuda"``.
"""

from __future__ import annotations

from typing import ClassVar

from kvik_triton_attention.backend import TritonAttentionBackend


class InterpretedTritonAttentionBackend(TritonAttentionBackend):
    supported_device_types: ClassVar[tuple[str, ...]] = ("cuda", "cpu")


class SmallTileTritonAttentionBackend(InterpretedTritonAttentionBackend):
    """Small tiles, so short test sequences span several KV tiles and query blocks."""

    decode_tile = (16, 16, 4)
    prefill_tile = (16, 16, 4)
    invariant_tile = (16, 16, 4)
