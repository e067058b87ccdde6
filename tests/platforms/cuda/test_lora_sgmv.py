"""The tiled LoRA kernels (SGMV, fused) and the config table (kvik_cuda.lora_kernels) against the reference.

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.lora.compute import add_lora_reference
from kvik_cuda.lora_fused import fused_block_n
from kvik_cuda.lora_kernels import CONFIGS, LoRAKernelConfig, add_lora_triton, config_for
from kvik_cuda.lora_sgmv import sgmv_splits
from kvik_cuda.lora_tiles import TileMap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}


def _problem(
    shards: tuple[int, ...], rank: int, dtype: torch.dtype, in_features: int, slots: list[int], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    num_slots, out, tokens = 4, sum(shards), len(slots)
    x = torch.randn(tokens, in_features, generator=g).to(DEVICE, dtype)
    a = (torch.randn(num_slots, len(shards) * rank, in_features, generator=g) * 0.3).to(DEVICE, dtype)
    b = (torch.randn(num_slots, out, rank, generator=g) * 0.3).to(DEVICE, dtype)
    a[:, rank - 1 :: rank] = 0  # a lower-rank adapter padded into the slot, as write_slot leaves it
    y = torch.randn(tokens, out, generator=g).to(DEVICE, dtype)
    return x, a, b, y, torch.tensor(slots, dtype=torch.int64, device=DEVICE)


def _check(
    shards: tuple[int, ...], rank: int, dtype: torch.dtype, in_features: int, slots: list[int], config: LoRAKernelConfig
) -> None:
    x, a, b, y, slot_t = _problem(shards, rank, dtype, in_features, slots, seed=len(slots) + rank)
    starts = tuple(sum(shards[:k]) for k in range(len(shards)))
    want, got = y.clone(), y.clone()
    add_lora_reference(want, x, a, b, slot_t, starts)
    add_lora_triton(got, x, a, b, slot_t, starts, config=config)
    assert torch.equal(got[slot_t < 0], y[slot_t < 0])  # base-model rows untouched
    if (slot_t >= 0).any():
        assert not torch.equal(got, y)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, in_features / 48))


MIXED = [2, -1, 0, 0, 1, -1, 2, 3, 3, 3, 0, -1, 1, 2, 2, 0, 1, 3, -1, 0, 0]  # 21 rows: tiles of 16 leave 5


@pytest.mark.parametrize(
    ("shards", "rank", "dtype", "in_features", "config"),
    [
        ((24,), 8, torch.float32, 48, LoRAKernelConfig()),
        ((16, 8, 8), 4, torch.float32, 300, LoRAKernelConfig(block_k=64, block_n=16, split_k=3)),  # split-K
        ((40, 40), 16, torch.float16, 48, LoRAKernelConfig(block_m=32, block_n=32)),  # a block spans both shards
        ((24, 8, 8), 8, torch.bfloat16, 260, LoRAKernelConfig(block_n=16, block_c=16)),  # blocks across shards
        ((16, 8, 8), 80, torch.float32, 64, LoRAKernelConfig(block_n=32)),  # rank above the expand's 64-wide step
        ((48,), 16, torch.bfloat16, 96, LoRAKernelConfig(block_n=32, expand_precision="tf32x3", num_stages=3)),
        # a capped expand grid (8 programs off CUDA): each program walks several (tile, column block) items
        ((24, 8, 8), 8, torch.float32, 260, LoRAKernelConfig(block_n=16, split_k=2, expand_per_sm=1)),
        ((24, 8, 8), 8, torch.bfloat16, 260, LoRAKernelConfig(block_n=32, expand_per_sm=2)),
        ((24, 8, 8), 8, torch.bfloat16, 260, LoRAKernelConfig(kernel="fused", block_n=16, block_k=64)),
        ((16, 8, 8), 80, torch.float32, 64, LoRAKernelConfig(kernel="fused", block_m=32, block_n=32, block_k=16)),
        ((40, 40), 16, torch.float16, 48, LoRAKernelConfig(kernel="fused", block_n=32, block_k=32)),
    ],
)
def test_tiled_kernels_match_the_reference_on_mixed_slots(
    shards: tuple[int, ...], rank: int, dtype: torch.dtype, in_features: int, config: LoRAKernelConfig
) -> None:
    _check(shards, rank, dtype, in_features, MIXED, config)


# Grouped by adapter (the scheduler's order), one adapter over two tiles, interleaved (more tiles than
# programs: walked grid-stride), base rows only.
@pytest.mark.parametrize(
    "slots", [[1], [-1, 3, -1], [0] * 17, [-1] * 5, list(range(4)) * 5 + [-1], sorted(MIXED, key=MIXED.index)]
)
@pytest.mark.parametrize("kernel", ["sgmv", "fused"])
def test_row_counts_and_slot_mixes(slots: list[int], kernel: str) -> None:
    _check((16, 8), 8, torch.float32, 40, slots, LoRAKernelConfig(kernel=kernel, block_n=16))


@settings(max_examples=12, deadline=None)
@given(
    st.lists(st.integers(-1, 3), min_size=1, max_size=40),
    st.sampled_from([16, 32]),
    st.sampled_from([(16,), (8, 24), (16, 8, 8)]),
    st.sampled_from(["sgmv", "fused"]),
)
def test_tiled_kernels_equal_reference_for_any_slot_sequence(
    slots: list[int], block_m: int, shards: tuple[int, ...], kernel: str
) -> None:
    # Any interleaving of adapters and base rows (the tile map cuts one tile per run of equal slots),
    # and the same rows grouped by adapter as the scheduler orders them.
    config = LoRAKernelConfig(kernel=kernel, block_m=block_m, block_n=16, block_k=16)
    _check(shards, 4, torch.float32, 32, slots, config)
    _check(shards, 4, torch.float32, 32, sorted(slots, key=slots.index), config)


def test_runner_kernels_cut_the_map_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonLoRA: prepare_step's map serves every call on the prepared slots; other slots get their own."""
    from kvik_cuda import lora_kernels

    monkeypatch.setattr(lora_kernels, "CONFIGS", {1: LoRAKernelConfig(block_n=16, block_k=16)})
    built: list[int] = []
    real_build = lora_kernels.build_tile_map

    def counted(slots: torch.Tensor, block_m: int, out: TileMap | None = None) -> TileMap:
        built.append(len(slots))
        return real_build(slots, block_m, out)

    monkeypatch.setattr(lora_kernels, "build_tile_map", counted)
    token_slots = torch.full((32,), -1, dtype=torch.int64, device=DEVICE)
    kernels = lora_kernels.TritonLoRA(32, DEVICE)
    grouped = sorted(MIXED, key=MIXED.index)
    token_slots[: len(grouped)] = torch.tensor(grouped)
    step = token_slots[: len(grouped)]
    kernels.prepare_step(step)
    for shards in ((16, 8, 8), (24,)):  # two projections of one step
        x, a, b, y, _ = _problem(shards, 4, torch.float32, 40, grouped)
        starts = tuple(sum(shards[:k]) for k in range(len(shards)))
        want, got = y.clone(), y.clone()
        add_lora_reference(want, x, a, b, step, starts)
        kernels(got, x, a, b, token_slots[: len(grouped)], starts)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert built == [len(grouped)] and kernels.maps_built == 1
    x, a, b, y, _ = _problem((24,), 4, torch.float32, 40, grouped[:7])
    want, got = y.clone(), y.clone()
    add_lora_reference(want, x, a, b, token_slots[:7], (0,))
    kernels(got, x, a, b, token_slots[:7], (0,))  # not the prepared rows: a map of its own
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert built == [len(grouped), 7]


def test_every_configured_bucket_runs_and_matches() -> None:
    # The table the sweep's output replaces: each entry must be a config that computes the delta.
    for config in {*CONFIGS.values(), LoRAKernelConfig(kernel="bgmv"), LoRAKernelConfig(kernel="fused")}:
        _check((16, 8, 8), 8, torch.bfloat16, 64, MIXED, config)


def test_deterministic() -> None:
    x, a, b, y, slots = _problem((16, 8, 8), 8, torch.float32, 300, MIXED)
    config = LoRAKernelConfig(block_k=32, block_n=16, split_k=4)
    first, second = y.clone(), y.clone()
    add_lora_triton(first, x, a, b, slots, (0, 16, 24), config=config)
    add_lora_triton(second, x, a, b, slots, (0, 16, 24), config=config)
    assert torch.equal(first, second)


def test_config_choice_is_a_function_of_the_token_count() -> None:
    table = {1: LoRAKernelConfig(kernel="bgmv"), 16: LoRAKernelConfig(block_m=16), 64: LoRAKernelConfig(block_m=64)}
    assert config_for(1, table).kernel == "bgmv"
    assert config_for(2, table).block_m == 16 and config_for(16, table).block_m == 16
    assert config_for(17, table).block_m == 64 and config_for(5000, table).block_m == 64
    assert config_for(1) is CONFIGS[min(CONFIGS)]


def test_split_k_from_shapes_and_config() -> None:
    decode = LoRAKernelConfig(block_m=16, block_k=128, block_c=16)
    assert sgmv_splits(1, 4096, 48, decode) == 16  # 3 column tiles x 16 splits: the reduction spread over SMs
    assert sgmv_splits(1, 64, 16, decode) == 1  # too short to split
    assert sgmv_splits(256, 14336, 16, LoRAKernelConfig(block_m=32)) == 8  # bounded by the expand's re-reads
    assert sgmv_splits(4096, 14336, 16, LoRAKernelConfig(block_m=64)) == 1
    assert sgmv_splits(1, 4096, 16, LoRAKernelConfig(split_k=3)) == 3


def test_fused_column_blocks_fit_one_wave() -> None:
    config = LoRAKernelConfig(kernel="fused", block_n=64)
    assert fused_block_n(4096, config) == 64  # o_proj: 64 programs
    assert fused_block_n(28672, config) == 256  # gate_up: 112 programs, not 448
    assert fused_block_n(10**6, config) == 256  # never wider than 256


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        LoRAKernelConfig(block_m=8)
    with pytest.raises(ValueError, match="not one of"):
        LoRAKernelConfig(kernel="cutlass")
