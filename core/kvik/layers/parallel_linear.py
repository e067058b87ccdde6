"""Tensor-parallel linear layers (Megatron's split): column-parallel in, row-parallel out.

A column-parallel layer holds a slice of the output rows of each merged projection
(q/k/v by heads, gate/up by intermediate units), so its output is this rank's slice
and needs no communication. A row-parallel layer holds the matching slice of the
input columns; its partial products are summed over the group with one all-reduce,
and its bias is added once, after the sum. Attention and the MLP therefore cost one
all-reduce each per layer.

With ``tensor_parallel_size == 1`` the factories return a plain :class:`Linear`, so
single-device models are exactly what they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvik.distributed.sharding import first_kv_head, kv_heads_per_rank, materialize, narrow, split_evenly
from kvik.layers.linear import Linear

if TYPE_CHECKING:
    from kvik.distributed.parallel_state import ParallelState
    from kvik.models.interface import ModelBuildContext


@dataclass(frozen=True, slots=True)
class RowSlice:
    """Rows ``[start, start + size)`` of one projection's full ``[full, in]`` checkpoint tensor."""

    start: int
    size: int
    full: int


class ColumnParallelLinear(Linear):
    """Holds ``slices[i]`` of merged projection ``i``; loads only those rows from the checkpoint."""

    def __init__(self, input_size: int, slices: list[RowSlice], bias: bool, **kwargs: Any) -> None:
        super().__init__(input_size, [s.size for s in slices], bias=bias, **kwargs)
        self.slices = slices

    def load(self, name: str, value: Any, shard: int | None = None) -> None:
        if name not in ("weight", "bias"):
            raise ValueError(f"a tensor-parallel layer cannot load the quantized tensor {name!r}")
        if shard is not None:
            s = self.slices[shard]
            value = narrow(value, 0, s.start, s.size)
        else:  # the merged tensor (Phi-3 style) or a single projection: this rank's rows of each part
            pieces, offset = [], 0
            for s in self.slices:
                pieces.append(narrow(value, 0, offset + s.start, s.size))
                offset += s.full
            value = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        super().load(name, value, shard)


class RowParallelLinear(Linear):
    """Holds input columns ``[start, start + local)``; the output is all-reduced, then biased."""

    def __init__(self, full_input: int, start: int, local_input: int, output_size: int, bias: bool,
                 parallel: ParallelState, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(local_input, output_size, bias=bias, **kwargs)
        self.full_input, self.start = full_input, start
        self._parallel = [parallel]  # a list: not a submodule, not a parameter

    def load(self, name: str, value: Any, shard: int | None = None) -> None:
        if name == "weight":
            value = narrow(value, 1, self.start, self.input_size)
        elif name == "bias":
            value = materialize(value)
        else:
            raise ValueError(f"a tensor-parallel layer cannot load the quantized tensor {name!r}")
        super().load(name, value, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._parallel[0].all_reduce(self.quant_method.apply(self, x))
        return out if self.bias is None else out + self.bias


def _lin(ctx: ModelBuildContext) -> dict[str, Any]:
    return dict(quant_method=ctx.quant_method, dtype=ctx.dtype, device=ctx.device)


def column_linear(ctx: ModelBuildContext, input_size: int, output_sizes: list[int], bias: bool) -> Linear:
    """Merged projections of ``output_sizes`` (e.g. gate and up), each split evenly over the ranks."""
    p = ctx.parallel
    if p.tp_size == 1:
        return Linear(input_size, output_sizes, bias=bias, **_lin(ctx))
    slices = []
    for full in output_sizes:
        local = split_evenly(full, p.tp_size, "the MLP's intermediate size")
        slices.append(RowSlice(p.tp_rank * local, local, full))
    return ColumnParallelLinear(input_size, slices, bias, **_lin(ctx))


def qkv_linear(
    ctx: ModelBuildContext, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool
) -> tuple[Linear, int, int]:
    """The merged q/k/v projection and this rank's (query heads, kv heads).

    Query heads are split evenly; kv heads too when there are at least as many as ranks,
    otherwise each rank holds the one kv head its query heads read (replication).
    """
    p = ctx.parallel
    if p.tp_size == 1:
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        return Linear(hidden, sizes, bias=bias, **_lin(ctx)), num_heads, num_kv_heads
    heads = split_evenly(num_heads, p.tp_size, "the number of attention heads")
    kv = kv_heads_per_rank(num_kv_heads, p.tp_size)
    kv_start = first_kv_head(num_kv_heads, p.tp_size, p.tp_rank)
    q = RowSlice(p.tp_rank * heads * head_dim, heads * head_dim, num_heads * head_dim)
    k = RowSlice(kv_start * head_dim, kv * head_dim, num_kv_heads * head_dim)
    return ColumnParallelLinear(hidden, [q, k, k], bias, **_lin(ctx)), heads, kv


def row_linear(ctx: ModelBuildContext, input_size: int, output_size: int, bias: bool) -> Linear:
    """A projection whose input is split over the ranks (attention's o, the MLP's down)."""
    p = ctx.parallel
    if p.tp_size == 1:
        return Linear(input_size, output_size, bias=bias, **_lin(ctx))
    local = split_evenly(input_size, p.tp_size, "a row-parallel layer's input size")
    return RowParallelLinear(input_size, p.tp_rank * local, local, output_size, bias, p, **_lin(ctx))
