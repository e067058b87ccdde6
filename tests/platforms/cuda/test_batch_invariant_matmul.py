"""The deterministic mode's Triton GEMM (kvik_cuda.batch_invariant): a row's result does not depend on M.

On CPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1), on tiny shapes
with a small tile so that M spans several tiles; the invariance checked is the kernel's own: the same
row computed alone, in a batch of M rows, and at another place in a tile, is bit-identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik_cuda.batch_invariant import (
    LARGE_M,
    SMALL_M,
    TILE_16BIT,
    TILE_FP32,
    TILE_LARGE_M,
    TILE_SMALL_M,
    TILES_MID,
    invariant_matmul,
    tile_for,
)

pytestmark = pytest.mark.usefixtures("row_by_row_interpreted_dot")  # tests/conftest.py says why
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILE = (16, 16, 16, 4, 1)
# Triton 3.9's interpreter mis-computes bf16 tl.dot (values ~1e10): fp16 stands for the 16-bit path there.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): several M and K tiles on tiny shapes


def _data(m: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_row_alone_equals_row_in_m37(dtype: torch.dtype) -> None:
    x, w, b = _data(37, 40, 48, dtype, seed=0)  # N and K not multiples of the tile: masked edges too
    full = invariant_matmul(x, w, b, tile=SMALL_TILE)
    for row in (0, 5, 17, 36):
        alone = invariant_matmul(x[row : row + 1], w, b, tile=SMALL_TILE)
        assert torch.equal(alone[0], full[row])
    # Against the reference product (the kernel accumulates in float32).
    want = (x.float() @ w.float().T + b.float()).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(full, want, rtol=tol, atol=tol)


def test_grouped_program_order_covers_every_tile() -> None:
    """More row tiles than one group (GROUP_M = 8) and a ragged last group: every tile computed once, right."""
    x, w, b = _data(150, 40, 48, torch.float32, seed=4)  # 10 row tiles of 16, 3 column tiles
    got = invariant_matmul(x, w, b, tile=SMALL_TILE)
    torch.testing.assert_close(got, x @ w.T + b, rtol=1e-5, atol=1e-5)
    for row in (0, 127, 128, 149):  # first group, and the ragged second one
        assert torch.equal(invariant_matmul(x[row : row + 1], w, b, tile=SMALL_TILE)[0], got[row])


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 40), pos=st.integers(0, 39), seed=st.integers(0, 2**16))
def test_any_batch_any_position(m: int, pos: int, seed: int) -> None:
    """One row, placed at any position of a batch of random neighbours, gives the same bits."""
    pos = pos % m
    x, w, _ = _data(m, 24, 40, torch.float32, seed)
    target, _, _ = _data(1, 24, 40, torch.float32, seed=12345)
    x[pos] = target[0]
    alone = invariant_matmul(target, w, tile=SMALL_TILE)[0]
    assert torch.equal(invariant_matmul(x, w, tile=SMALL_TILE)[pos], alone)


def test_tile_by_rows() -> None:
    bf16 = torch.bfloat16
    assert tile_for(4096, 14336, 1, bf16) == tile_for(4096, 14336, SMALL_M, bf16) == (TILE_SMALL_M, False)
    assert tile_for(4096, 14336, SMALL_M + 1, bf16) == TILES_MID[(4096, 14336)]
    assert tile_for(1000, 64, LARGE_M, torch.float16) == (TILE_16BIT, True)  # a shape not in the measured table
    assert tile_for(4096, 14336, LARGE_M + 1, bf16) == (TILE_LARGE_M, True)
    assert tile_for(4096, 14336, 1, torch.float32) == tile_for(4096, 14336, 8192, torch.float32) == (TILE_FP32, False)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter's dot sums a k-tile at once; a GPU's MMA 16 deep")
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (1000, 200)])
def test_every_16bit_tile_gives_the_same_bits(n: int, k: int) -> None:
    """What lets the tile follow M: the same rows through every tile tile_for can pick, with either kind of load
    (K = 200 rows are not 16-byte aligned: TMA falls back to plain loads there), bit for bit."""
    x, w, b = _data(300, n, k, torch.bfloat16, seed=7)
    tiles = {TILE_SMALL_M, TILE_LARGE_M, TILE_16BIT, *(t for t, _ in TILES_MID.values()), (64, 64, 64, 4, 2)}
    want = invariant_matmul(x, w, b, tile=TILE_16BIT)
    for tile in tiles:
        for tma in (False, True):
            assert torch.equal(invariant_matmul(x, w, b, tile=tile, tma=tma), want), (tile, tma)


def test_a_tile_too_large_for_the_gpu_falls_back_to_the_small_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvik_cuda import batch_invariant
    from triton.runtime.errors import OutOfResources

    launched = []
    real = batch_invariant._launch

    def launch(x, weight, bias, out, tile):  # type: ignore[no-untyped-def]
        launched.append(tile)
        if tile != batch_invariant.TILE_SMALL_FALLBACK:
            raise OutOfResources(147456, 101376, "shared memory")
        real(x, weight, bias, out, (16, 16, 16, 4, 1))  # the interpreter's tiny tile stands in for it

    monkeypatch.setattr(batch_invariant, "_launch", launch)
    x, w, b = _data(3, 40, 48, torch.float32, seed=2)
    got = invariant_matmul(x, w, b)
    assert launched == [TILE_FP32, batch_invariant.TILE_SMALL_FALLBACK]
    torch.testing.assert_close(got, x @ w.T + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(OutOfResources):  # an explicit tile is not replaced behind the caller's back
        invariant_matmul(x, w, b, tile=SMALL_TILE)


def test_shape_mismatch_is_a_clear_error() -> None:
    x, w, _ = _data(2, 8, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not match"):
        invariant_matmul(x, w[:, :8])


def test_tma_loads_give_the_same_bits() -> None:
    """The tensor-descriptor variant runs the same MMAs in the same order: equal to the plain loads, bit for bit
    (16-bit only; float32 and unaligned operands take the plain loads)."""
    x, w, b = _data(37, 40, 64, HALF, seed=3)
    plain = invariant_matmul(x, w, b, tile=SMALL_TILE)
    assert torch.equal(invariant_matmul(x, w, b, tile=SMALL_TILE, tma=True), plain)
    x, w, b = _data(21, 24, 80, HALF, seed=4)  # K = 80 ends in a partial 32-deep k-tile: TMA zero-pads it
    tile = (16, 16, 32, 4, 1)
    assert torch.equal(invariant_matmul(x, w, b, tile=tile, tma=True), invariant_matmul(x, w, b, tile=tile))
    xf, wf, bf = _data(5, 40, 48, torch.float32, seed=3)
    assert torch.equal(invariant_matmul(xf, wf, bf, tile=SMALL_TILE, tma=True), invariant_matmul(xf, wf, bf, tile=SMALL_TILE))
