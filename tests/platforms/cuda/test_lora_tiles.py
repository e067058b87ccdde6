"""The SGMV tile map (kvik_cuda.lora_tiles): one slot per tile, every adapter row in exactly one tile.

The map kernel runs under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik_cuda.lora_tiles import build_tile_map, empty_tile_map, tile_programs

NUM_SLOTS = 4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernel needs device tensors
slot_lists = st.lists(st.integers(-1, NUM_SLOTS - 1), min_size=0, max_size=80)


def _tiles(slots: list[int], block_m: int, chunk: int = 1024) -> list[tuple[int, int, int]]:
    tile_map = build_tile_map(torch.tensor(slots, dtype=torch.int64, device=DEVICE), block_m, chunk=chunk)
    count = int(tile_map.count.item())
    assert not tile_map.tiles[1, count:].any(), "columns past the count hold no rows"
    return [tuple(col) for col in tile_map.tiles[:, :count].T.tolist()]


def _expected(slots: list[int], block_m: int) -> list[tuple[int, int, int]]:
    """Plain-Python runs of equal slots, each adapter run cut into block_m-row tiles."""
    out, start = [], 0
    for slot, run in itertools.groupby(slots):
        length = len(list(run))
        if slot >= 0:
            out += [(start + i, min(block_m, length - i), slot) for i in range(0, length, block_m)]
        start += length
    return out


def _check_invariants(slots: list[int], block_m: int, tiles: list[tuple[int, int, int]]) -> None:
    covered = [0] * len(slots)
    for first, rows, slot in tiles:
        assert 1 <= rows <= block_m and slot >= 0
        assert all(slots[t] == slot for t in range(first, first + rows)), "a tile holds one slot"
        for t in range(first, first + rows):
            covered[t] += 1
    assert covered == [int(s >= 0) for s in slots], "every adapter row in one tile, base rows in none"


@settings(max_examples=150, deadline=None)
@given(slot_lists, st.sampled_from([1, 2, 4, 16]), st.sampled_from([16, 1024]))
def test_any_slot_order(slots: list[int], block_m: int, chunk: int) -> None:
    # chunk=16: the map kernel walks the rows in several chunks, carrying runs and tiles across them.
    tiles = _tiles(slots, block_m, chunk)
    _check_invariants(slots, block_m, tiles)
    assert tiles == _expected(slots, block_m)  # in row order, and no more tiles than the runs need


@settings(max_examples=150, deadline=None)
@given(slot_lists, st.sampled_from([1, 2, 4, 16]))
def test_rows_grouped_by_slot_fit_the_grid_in_one_pass(slots: list[int], block_m: int) -> None:
    # What the scheduler produces: each adapter's rows side by side (groups in any order, base rows too).
    grouped = sorted(slots, key=slots.index)
    tiles = _tiles(grouped, block_m)
    _check_invariants(grouped, block_m, tiles)
    per_slot = [grouped.count(s) for s in set(grouped) if s >= 0]
    assert len(tiles) == sum(-(-n // block_m) for n in per_slot)  # only each adapter's last tile is partial
    assert len(tiles) <= tile_programs(len(grouped), block_m, NUM_SLOTS)


def test_interleaved_rows_make_one_row_tiles() -> None:
    slots = [0, 1, 2, 3] * 8
    tiles = _tiles(slots, 16)
    assert [rows for _, rows, _ in tiles] == [1] * 32
    assert len(tiles) > tile_programs(32, 16, NUM_SLOTS)  # more tiles than programs: walked grid-stride


def test_programs_are_bounded_by_rows_and_by_tiles_plus_slots() -> None:
    assert tile_programs(1, 16, 8) == 1  # one row: one program
    assert tile_programs(256, 64, 8) == 12  # 4 full tiles + one partial tile per adapter
    assert tile_programs(1024, 64, 1) == 17
    assert tile_programs(0, 16, 4) == 1


def test_a_reused_buffer_gives_the_fresh_map() -> None:
    """The runner's persistent buffers: a shorter step after a longer one (stale columns past the count)."""
    buffers = empty_tile_map(64, 4, DEVICE)
    build_tile_map(torch.arange(64, device=DEVICE) % 3, 4, out=buffers)
    short = torch.tensor([-1, 2, 2, 2, 2, 2, 0, -1, -1], device=DEVICE)
    build_tile_map(short, 4, out=buffers)
    count = int(buffers.count.item())
    assert [tuple(c) for c in buffers.tiles[:, :count].T.tolist()] == [(1, 4, 2), (5, 1, 2), (6, 1, 0)]
    build_tile_map(torch.full((5,), -1, device=DEVICE), 4, out=buffers)
    assert int(buffers.count.item()) == 0
    with pytest.raises(AssertionError):
        build_tile_map(torch.zeros(65, dtype=torch.int64, device=DEVICE), 4, out=buffers)  # over capacity
