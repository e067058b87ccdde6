"""Cutting checkpoint tensors into this rank's slice, reading only that slice where the format allows.

A checkpoint value is either a ``torch.Tensor`` or a :class:`LazyTensor` (a safetensors
slice handle: nothing is read until it is indexed), so a tensor-parallel rank reads
``1/tp_size`` of each split weight from disk, and a pipeline stage never reads the
layers it does not hold.
"""

from __future__ import annotations

from typing import Any

import torch


class LazyTensor:
    """A checkpoint tensor not read yet: ``shape``, :meth:`narrow` (reads one slice), :meth:`load` (all)."""

    __slots__ = ("_slice", "shape")

    def __init__(self, handle: Any) -> None:
        self._slice = handle  # safetensors' PySafeSlice (valid while its file is open)
        self.shape = torch.Size(handle.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]

    def load(self) -> torch.Tensor:
        return self._slice[tuple(slice(None) for _ in self.shape)] if self.shape else self._slice[...]

    def to(self, dtype: torch.dtype) -> torch.Tensor:  # what plain-parameter loading calls
        return self.load().to(dtype)


def materialize(value: Any) -> Any:
    """A tensor for a checkpoint value (a :class:`LazyTensor` is read whole; anything else passes)."""
    return value.load() if isinstance(value, LazyTensor) else value


def narrow(value: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """``value[..., start:start + length, ...]`` along ``dim``, reading only that slice when lazy."""
    if isinstance(value, LazyTensor):
        return value.narrow(dim, start, length)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"tensor parallelism needs dense tensors, got {type(value).__name__} (quantized checkpoints "
            "are not split across devices yet)"
        )
    if value.shape[dim] < start + length:
        raise ValueError(f"shape {tuple(value.shape)} has no slice {start}:{start + length} on dim {dim}")
    return value.narrow(dim, start, length)


def split_evenly(total: int, parts: int, what: str) -> int:
    """``total // parts``, or a ValueError naming ``what`` when it does not divide."""
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size={parts}")
    return total // parts


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: an even share, or 1 (replicated) when there are fewer kv heads than ranks."""
    if num_kv_heads >= tp_size:
        return split_evenly(num_kv_heads, tp_size, "the number of key/value heads")
    if tp_size % num_kv_heads:
        raise ValueError(
            f"{num_kv_heads} key/value heads cannot be replicated evenly over tensor_parallel_size={tp_size}; "
            f"use a size that divides or is divided by {num_kv_heads}"
        )
    return 1


def first_kv_head(num_kv_heads: int, tp_size: int, tp_rank: int) -> int:
    """The first kv head rank ``tp_rank`` holds. With fewer kv heads than ranks, rank r's query heads
    (a contiguous ``heads / tp`` run) all read kv head ``r * kv // tp``, so that one is replicated there."""
    return tp_rank * num_kv_heads // tp_size if num_kv_heads < tp_size else tp_rank * (num_kv_heads // tp_size)
