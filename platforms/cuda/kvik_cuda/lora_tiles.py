"""The SGMV tile map: a step's token rows cut into tiles that each hold one adapter slot.

The tiled LoRA kernels (:mod:`kvik_cuda.lora_sgmv`, :mod:`kvik_cuda.lora_fused`) give each program
a tile of up to ``block_m`` rows that all share one slot, so a tile is one ``tl.dot`` pass over one
adapter's weights. The map is cut from *runs* of equal slots (maximal stretches of adjacent rows
with one slot): each run of slot ``>= 0`` becomes ``ceil(len / block_m)`` tiles, base-model runs
(slot ``-1``) none. The scheduler orders a step's rows by adapter, so each adapter is one run;
rows in any other order are still exact, only cut into more, smaller tiles.

Every projection of a step reads the same rows, so the runner builds the map once per step
(:class:`kvik_cuda.lora_kernels.TritonLoRA`), with torch ops on the device (no host read: valid
before a CUDA graph replay, which reads the map from the persistent buffers it was captured with).

How many programs: with ``n_r`` rows in run ``r``, the tiles number ``sum ceil(n_r / block_m) <=
floor(T / block_m) + runs`` (a sum of floors is at most the floor of the sum), and at most ``T``
(a tile holds a row). Sorted rows make at most ``num_slots`` adapter runs, so :func:`tile_programs`
launches ``min(T, T // block_m + num_slots)`` programs: a function of shapes only (one compile and
graph per bucket). Unsorted rows can make more tiles than that; the kernels then walk the tiles
grid-stride (program ``p`` takes tiles ``p, p + G, ...`` up to the map's count), which stays exact
and costs extra passes only where the rows were not grouped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TileMap:
    """A step's tiles: ``tiles[:, i]`` = (first row, row count, slot) of tile ``i < count``."""

    block_m: int
    tiles: torch.Tensor  # [3, capacity >= T] int32 (columns past ``count`` unused)
    count: torch.Tensor  # [1] int32: tiles in use


def tile_programs(num_tokens: int, block_m: int, num_slots: int) -> int:
    """Programs along the kernels' row axis: every tile of rows grouped by slot in one pass (see above)."""
    return max(1, min(num_tokens, num_tokens // block_m + num_slots))


def empty_tile_map(capacity: int, block_m: int, device: torch.device | str) -> TileMap:
    """Buffers for maps of up to ``capacity`` rows (the runner's persistent ones)."""
    tiles = torch.zeros((3, max(1, capacity)), dtype=torch.int32, device=device)
    return TileMap(block_m, tiles, torch.zeros(1, dtype=torch.int32, device=device))


def build_tile_map(slots: torch.Tensor, block_m: int, out: TileMap | None = None) -> TileMap:
    """The tile map of ``slots`` ([T] int, -1 = base model) for ``block_m``-row tiles, written into
    ``out`` (its capacity at least T, its block_m equal) or into new tensors. Device ops only."""
    num_tokens, device = slots.shape[0], slots.device
    if out is None:
        out = empty_tile_map(num_tokens, block_m, device)
    assert out.block_m == block_m and out.tiles.shape[1] >= num_tokens
    if num_tokens == 0:
        out.count.zero_()
        return out
    rows = torch.arange(num_tokens, device=device)
    # run_start[i]: a run starts at row i; run_start[T] closes the last one.
    run_start = torch.ones(num_tokens + 1, dtype=torch.bool, device=device)
    run_start[1:num_tokens] = slots[1:] != slots[:-1]
    offset = rows - torch.cummax(torch.where(run_start[:num_tokens], rows, 0), dim=0).values  # row's place in its run
    adapter = slots >= 0
    first = adapter & (offset % block_m == 0)
    last = adapter & (run_start[1:] | (offset % block_m == block_m - 1))
    tile = torch.cumsum(first, dim=0) - 1  # a row's tile (rows of one tile see the same count)
    spill = num_tokens  # where rows that start/end no tile scatter to (a column dropped below)
    firsts = torch.zeros(num_tokens + 1, dtype=torch.int64, device=device)
    firsts.scatter_(0, torch.where(first, tile, spill), rows)
    lasts = torch.full((num_tokens + 1,), -1, dtype=torch.int64, device=device)
    lasts.scatter_(0, torch.where(last, tile, spill), rows)
    firsts, lasts = firsts[:num_tokens], lasts[:num_tokens]
    counts = lasts - firsts + 1  # 0 past the real tiles (first 0, last -1)
    tile_slots = torch.where(counts > 0, slots[firsts], -1)
    out.tiles[:, :num_tokens].copy_(torch.stack((firsts, counts, tile_slots)))
    out.count.copy_(first.sum().reshape(1))
    return out
