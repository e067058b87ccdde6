"""The SGMV tile map: a step's token rows cut into tiles that each hold one adapter slot.

The tiled LoRA kernels (:mod:`kvik_cuda.lora_sgmv`, :mod:`kvik_cuda.lora_fused`) give each program
a tile of up to ``block_m`` rows that all share one slot, so a tile is one ``tl.dot`` pass over one
adapter's weights. The map is cut from *runs* of equal slots (maximal stretches of adjacent rows
with one slot): each run of slot ``>= 0`` becomes ``ceil(len / block_m)`` tiles, base-model runs
(slot ``-1``) none. The scheduler orders a step's rows by adapter, so each adapter is one run;
rows in any other order are still exact, only cut into more, smaller tiles.

Every projection of a step reads the same rows, so the runner builds the map once per step
(:class:`kvik_cuda.lora_kernels.TritonLoRA`), in one launch of a one-program kernel that walks the
slots (a max-scan finds each row's run, a cumsum numbers the tiles): no host read, so it is valid
before a CUDA graph replay, which reads the map from the persistent buffers it was captured with.

How many programs: with ``n_r`` rows in run ``r``, the tiles number ``sum ceil(n_r / block_m) <=
floor(T / block_m) + runs`` (a sum of floors is at most the floor of the sum), and at most ``T``
(a tile holds a row). Rows grouped by slot make at most ``num_slots`` adapter runs, so :func:`tile_programs`
launches ``min(T, T // block_m + num_slots)`` programs: a function of shapes only (one compile and
graph per bucket). Ungrouped rows can make more tiles than that; the kernels then walk the tiles
grid-stride (program ``p`` takes tiles ``p, p + G, ...`` up to the map's count), which stays exact
and costs extra passes only where the rows were not grouped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

CHUNK = 1024  # rows per step of the map kernel's walk


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


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit(do_not_specialize=["num_tokens"])
def _tile_map_kernel(
    slots_ptr, tiles_ptr, count_ptr, num_tokens, stride_tiles, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr
):  # fmt: skip
    """One program walks the rows in chunks, carrying the open run's first row and the tiles so far."""
    run_carry = 0  # first row of the run open at the chunk's start
    num_tiles = 0
    for c0 in range(0, num_tokens, CHUNK):
        rows = c0 + tl.arange(0, CHUNK)
        ok = rows < num_tokens
        slot = tl.load(slots_ptr + rows, mask=ok, other=-1)
        prev = tl.load(slots_ptr + rows - 1, mask=ok & (rows > 0), other=-2)
        nxt = tl.load(slots_ptr + rows + 1, mask=rows + 1 < num_tokens, other=-2)
        run_first = tl.associative_scan(tl.where(slot != prev, rows, run_carry), 0, _max)
        place = (rows - run_first) % BLOCK_M  # the row's place in its tile
        adapter = ok & (slot >= 0)
        first = adapter & (place == 0)
        last = adapter & ((nxt != slot) | (place == BLOCK_M - 1))
        tile = num_tiles + tl.cumsum(first.to(tl.int32), 0) - 1  # a row's tile (its first row is at or before it)
        tl.store(tiles_ptr + tile, rows, mask=first)
        tl.store(tiles_ptr + 2 * stride_tiles + tile, slot.to(tl.int32), mask=first)
        tl.store(tiles_ptr + stride_tiles + tile, place + 1, mask=last)
        num_tiles += tl.sum(first.to(tl.int32), 0)
        run_carry = tl.max(run_first, 0)
    tl.store(count_ptr, num_tiles)


def build_tile_map(slots: torch.Tensor, block_m: int, out: TileMap | None = None, chunk: int = CHUNK) -> TileMap:
    """The tile map of ``slots`` ([T] int, -1 = base model) for ``block_m``-row tiles, written into
    ``out`` (its capacity at least T, its block_m equal) or into new tensors. One launch, no host read;
    columns past the map's count are left as they were (the kernels never read them)."""
    num_tokens = slots.shape[0]
    if out is None:
        out = empty_tile_map(num_tokens, block_m, slots.device)
    assert out.block_m == block_m and out.tiles.shape[1] >= num_tokens
    if num_tokens == 0:
        out.count.zero_()
        return out
    chunk = min(chunk, triton.next_power_of_2(num_tokens))
    _tile_map_kernel[(1,)](slots, out.tiles, out.count, num_tokens, out.tiles.stride(0), BLOCK_M=block_m, CHUNK=chunk)
    return out
