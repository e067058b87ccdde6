"""The CUDA platform's batched LoRA delta (:mod:`kvik.lora.compute`): which Triton kernels, with which tiles.

Two kernel families compute ``kvik.lora.compute.add_lora_reference``'s result:

- ``sgmv`` (:mod:`kvik_cuda.lora_sgmv`): tiles of token rows × outputs on the tensor cores, each
  tile's rows under one adapter slot (:mod:`kvik_cuda.lora_tiles`: a tile map cut from runs of
  equal slots, built once per step);
- ``fused`` (:mod:`kvik_cuda.lora_fused`): the SGMV tiles in one launch, each program recomputing the
  shrink its columns need (for decode, where launches, not work, bound the delta);
- ``bgmv`` (:mod:`kvik_cuda.lora_bgmv`): one program per token row, reductions in registers.

Which one runs, and its block sizes, warps and pipeline stages, come from :data:`CONFIGS`, a table
keyed by token-count bucket: a pure function of the step's shape, so every captured CUDA graph
(one per batch size) bakes in one fixed choice. ``benchmarks/lora_kernels_sweep.py`` measures
the candidates on a GPU and prints a replacement for the table.

:class:`TritonLoRA` is what a runner installs as ``LoRAState.add_lora`` and ``LoRAState.project``: it
builds the step's tile map once (``prepare_step``, after the runner writes the per-token slots) into
persistent buffers that all the step's projections, and the CUDA graphs captured over them, read; and at
decode sizes it runs each projection's shrink on a side stream while the base matmul runs (the shrink
reads only ``x``), so the delta costs about the expand's launch, not both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kvik_cuda.lora_bgmv import add_lora_bgmv, bgmv_expand, bgmv_shrink, shrink_splits
from kvik_cuda.lora_fused import add_lora_fused
from kvik_cuda.lora_sgmv import add_lora_sgmv
from kvik_cuda.lora_tiles import TileMap, build_tile_map, empty_tile_map

__all__ = ["CONFIGS", "LoRAKernelConfig", "TritonLoRA", "add_lora_triton", "config_for", "shrink_splits"]


KERNELS = ("sgmv", "fused", "bgmv")


@dataclass(frozen=True, slots=True)
class LoRAKernelConfig:
    """One choice of kernel and tiles (``fused`` ignores block_c and split_k; ``bgmv`` reads only split_k)."""

    kernel: str = "sgmv"  # "sgmv", "fused" or "bgmv"
    block_m: int = 16  # token rows per program (tl.dot needs >= 16)
    block_k: int = 128  # shrink: reduction step over ``in``
    block_c: int = 64  # shrink: S*R output columns per program (capped at what the projection has)
    block_n: int = 64  # expand: output columns per program
    split_k: int = 0  # shrink: reduction splits; 0 = chosen from the shapes
    num_warps: int = 4
    num_stages: int = 2
    expand_precision: str = "ieee"  # the expand's float32 dot: "ieee" (exact products) or "tf32x3"
    expand_per_sm: int = 0  # sgmv expand: programs per SM walking the (tile, column block) items; 0 = one each

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"LoRA kernel {self.kernel!r} is not one of {', '.join(KERNELS)}")
        for name in ("block_m", "block_k", "block_c", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value}: LoRA kernel tiles are powers of two >= 16")
        if self.expand_per_sm < 0:
            raise ValueError(f"expand_per_sm={self.expand_per_sm}: 0 (a program per work item) or a count")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# Token-count bucket -> config: a step of T rows uses the smallest key >= T (the largest key beyond).
# Measured on one H200 (2026-11-30, benchmarks/lora_kernels_sweep.py, 8B projections, rank 16, rows
# under 1 and under 8 interleaved adapters; the table minimises the summed ratio to the base matmul).
# BGMV with split-K wins up to 64 rows: with adapters interleaved, an SGMV tile then paid one tl.dot
# pass per distinct slot it held, and the fused one-launch kernel lost to BGMV's split-K at every size.
# From 256 rows the tiled SGMV GEMMs win (0.25-0.5x the base matmul under one adapter). Since then
# rows come grouped by adapter and every tile holds one slot (kvik_cuda.lora_tiles): to be re-swept.
# One row (2026-12-01, lora_throughput.py --parts batch1, the shrink on its side stream beside the base GEMM):
# split 8 / 16 / 32 / 64 cost +12.7% / +16.1% / +17.9% / +17.3% of batch-1 decode; fewer, longer shrink
# programs disturb the base GEMM less and leave the expand fewer partial sums.
# 256 and 1024 rows (2026-12-01, runs j3 and j7, rows grouped by adapter): 16-row tiles, two warps, and an
# expand grid of 32 programs per SM walking the (tile, column block) items. Summed over the four projections,
# against the base matmul, 256 rows: 0.32 / 0.36 / 0.82 under 1 / 8 / 64 adapters, where 64-row tiles with a
# program per item cost 0.35 / 0.49 / 1.99 (j3); 1024 rows: 0.25 / 0.27 / 0.35 against 0.27 / 0.32 / 0.61.
CONFIGS: dict[int, LoRAKernelConfig] = {
    1: LoRAKernelConfig(kernel="bgmv", split_k=8),
    16: LoRAKernelConfig(kernel="bgmv", split_k=16),
    64: LoRAKernelConfig(kernel="bgmv"),
    256: LoRAKernelConfig(block_n=128, num_warps=2, num_stages=3, expand_precision="tf32x3", expand_per_sm=32),
    1024: LoRAKernelConfig(block_n=128, num_warps=2, num_stages=3, expand_precision="tf32x3", expand_per_sm=32),
}


def config_for(num_tokens: int, table: dict[int, LoRAKernelConfig] | None = None) -> LoRAKernelConfig:
    """The config of the smallest bucket holding ``num_tokens`` rows (graph-safe: shapes only)."""
    table = CONFIGS if table is None else table
    buckets = sorted(table)
    for bucket in buckets:
        if num_tokens <= bucket:
            return table[bucket]
    return table[buckets[-1]]


def add_lora_triton(
    y: torch.Tensor,  # [T, out], updated in place
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [L, S * R, in]
    b: torch.Tensor,  # [L, out, R]
    slots: torch.Tensor,  # [T] int64, -1 = no adapter
    shard_starts: tuple[int, ...],  # first output column of each of the S <= 3 shards
    config: LoRAKernelConfig | None = None,  # None: config_for(T)
    tiles: TileMap | None = None,  # sgmv/fused: the slots' map for config.block_m; None: built here
) -> None:
    """``kvik.lora.compute.add_lora_reference`` as Triton launches (graph-safe: no host reads)."""
    num_tokens = y.shape[0]
    if num_tokens == 0:
        return
    assert len(shard_starts) <= 3, "at most three shards (q/k/v) per projection"
    assert x.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1 and y.stride(1) == 1
    config = config or config_for(num_tokens)
    if config.kernel == "bgmv":
        add_lora_bgmv(y, x, a, b, slots, shard_starts, split_k=config.split_k)
        return
    if tiles is None:
        tiles = build_tile_map(slots, config.block_m)
    if config.kernel == "fused":
        add_lora_fused(y, x, a, b, tiles, shard_starts, config)
    else:
        add_lora_sgmv(y, x, a, b, tiles, shard_starts, config)


class TritonLoRA:
    """``LoRAState.add_lora`` for a runner: the table's kernels, with the tile map built once per step.

    ``prepare_step(token_slots[:T])`` (the runner, every step, after writing the slots) cuts the
    map for ``config_for(T)`` into buffers of ``max_tokens`` rows that never move, so a CUDA graph
    captured over them replays with the map of the step being replayed. A call whose slots are
    not the prepared ones (another view, another row count) builds its own map: slower, still exact.
    """

    def __init__(self, max_tokens: int, device: torch.device | str) -> None:
        self._buffers = empty_tile_map(max_tokens, 16, device)
        # The shrinks' stream. Every use starts by waiting for the main stream's work so far, so a partial-sum
        # buffer freed back to this stream's pool is never reused before the expand that read it has run.
        self._side = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None
        self._map: TileMap | None = None
        self._prepared: tuple[int, int] | None = None  # (slots data_ptr, T) the map was cut from
        self.maps_built = 0  # prepare_step maps (tests count them: one per step, not per projection)

    def prepare_step(self, slots: torch.Tensor) -> None:
        num_tokens = slots.shape[0]
        config = config_for(num_tokens)
        self._prepared, self._map = None, None
        if config.kernel == "bgmv" or num_tokens == 0:
            return  # one program per row: nothing to cut
        buffers = TileMap(config.block_m, self._buffers.tiles, self._buffers.count)
        self._map = build_tile_map(slots, config.block_m, out=buffers)
        self._prepared = (slots.data_ptr(), num_tokens)
        self.maps_built += 1

    def __call__(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        slots: torch.Tensor,
        shard_starts: tuple[int, ...],
    ) -> None:
        prepared = self._prepared == (slots.data_ptr(), slots.shape[0])
        add_lora_triton(y, x, a, b, slots, shard_starts, tiles=self._map if prepared else None)

    def project(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        slots: torch.Tensor,
        shard_starts: tuple[int, ...],
        base: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``base(x)`` plus the delta. Decode-sized steps (the BGMV buckets) run the shrink on the side stream
        beside the base matmul (fork and join are stream waits, which CUDA graph capture records as edges);
        larger ones run in order: there the base GEMM is compute-bound and a concurrent SGMV shrink slowed the
        64-adapter offline run from 0.60x to 0.48x of the base model (2026-12-01, H200). CPU tensors (the
        interpreter) and empty steps also run in order."""
        num_tokens = x.shape[0]
        config = config_for(num_tokens)
        if self._side is None or x.device.type != "cuda" or num_tokens == 0 or config.kernel != "bgmv":
            y = base(x)
            self(y, x, a, b, slots, shard_starts)
            return y
        assert x.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1
        main = torch.cuda.current_stream(x.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            partial = bgmv_shrink(x, a, slots, config.split_k)
        y = base(x)
        main.wait_stream(self._side)
        assert y.stride(1) == 1
        bgmv_expand(y, partial, b, slots, shard_starts)
        return y
