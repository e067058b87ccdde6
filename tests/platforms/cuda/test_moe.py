"""The Triton grouped-GEMM MoE against the torch reference experts (kvik.layers.moe).

On CPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1), on
small shapes; on a GPU the same tests run compiled.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.layers.moe import MoEExperts, SparseMoE, route
from kvik_cuda.fused import fuse_layers
from kvik_cuda.moe import TritonMoEExperts, TritonSparseMoE, route_fused, sort_by_expert

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype = torch.float32) -> MoEExperts:
    gen = torch.Generator().manual_seed(0)
    experts = MoEExperts(num_experts, hidden, inter, dtype, DEVICE)
    experts.w13.data = (torch.randn(experts.w13.shape, generator=gen) * 0.2).to(dtype).to(DEVICE)
    experts.w2.data = (torch.randn(experts.w2.shape, generator=gen) * 0.2).to(dtype).to(DEVICE)
    return experts


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    num_experts=st.integers(1, 9),
    top_k=st.integers(1, 3),
    block_m=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_sort_by_expert_groups_every_pair_once(n: int, num_experts: int, top_k: int, block_m: int, seed: int) -> None:
    top_k = min(top_k, num_experts)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(n)])
    pairs, tile_expert = sort_by_expert(ids, num_experts, block_m)
    assert pairs.numel() == tile_expert.numel() * block_m
    flat = ids.reshape(-1)
    real = pairs[pairs < flat.numel()].long()
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every pair exactly once
    for tile, expert in enumerate(tile_expert.tolist()):
        members = pairs[tile * block_m : (tile + 1) * block_m].long()
        members = members[members < flat.numel()]
        if expert < 0:
            assert members.numel() == 0
        else:
            assert bool((flat[members] == expert).all())  # a tile serves one expert


@pytest.mark.parametrize(
    ("n", "num_experts", "top_k", "hidden", "inter"),
    [(1, 4, 2, 32, 32), (7, 4, 2, 48, 40), (37, 6, 2, 64, 96), (70, 8, 3, 32, 64)],
)
def test_triton_experts_match_reference(n: int, num_experts: int, top_k: int, hidden: int, inter: int) -> None:
    reference = _experts(num_experts, hidden, inter)
    fused = copy.deepcopy(reference)
    assert fuse_layers(fused) == {"TritonMoEExperts": 1}  # exact types: a bare MoEExperts
    assert isinstance(fused, TritonMoEExperts)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, hidden, generator=gen).to(DEVICE)
    weights, ids = route(torch.randn(n, num_experts, generator=gen).to(DEVICE), top_k, renormalize=n % 2 == 0)
    torch.testing.assert_close(fused(x, weights, ids), reference(x, weights, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("pairwise_max", "tile"), [(0, None), (10_000, None), (10_000, (2, 32, 1, True))])
@pytest.mark.parametrize(("n", "top_k"), [(1, 2), (5, 3), (32, 2)])
def test_decode_gemv_and_grouped_gemm_paths_agree(
    monkeypatch, pairwise_max: int, tile: tuple[int, int, int, bool] | None, n: int, top_k: int
) -> None:
    """Either path (sort-free per-pair GEMV, or sorted grouped GEMM) gives the reference's output; the GEMV
    also with a one-warp tile reduced once (K = 48 and 40 over 32-wide steps: a masked tail)."""
    import kvik_cuda.moe as moe

    monkeypatch.setattr(moe, "PAIRWISE_MAX_PAIRS", pairwise_max)
    if tile is not None:
        monkeypatch.setattr(moe, "gemv_config", lambda n_out, k_in: tile)
    reference = _experts(5, 48, 40)
    fused = copy.deepcopy(reference)
    fuse_layers(fused)
    gen = torch.Generator().manual_seed(n * 10 + top_k)
    x = torch.randn(n, 48, generator=gen).to(DEVICE)
    weights, ids = route(torch.randn(n, 5, generator=gen).to(DEVICE), top_k, renormalize=True)
    torch.testing.assert_close(fused(x, weights, ids), reference(x, weights, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE == "cpu", reason="16-bit tl.dot needs a GPU (the interpreter is float32-exact only)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [300, 4])  # the grouped GEMM, and the decode GEMV
def test_triton_experts_16_bit(dtype: torch.dtype, n: int) -> None:
    reference = _experts(8, 256, 512, dtype)
    fused = copy.deepcopy(reference)
    fuse_layers(fused)
    x = torch.randn(n, 256, device=DEVICE).to(dtype)
    weights, ids = route(torch.randn(n, 8, device=DEVICE), 2, renormalize=True)
    torch.testing.assert_close(fused(x, weights, ids), reference(x, weights, ids), atol=2e-2, rtol=2e-2)


def test_sparse_moe_block_uses_the_fused_experts() -> None:
    block = SparseMoE(32, num_experts=4, top_k=2, intermediate_size=32, renormalize=True, device=DEVICE)
    block.gate.weight.data.normal_()
    block.experts.w13.data.normal_(0, 0.2)
    block.experts.w2.data.normal_(0, 0.2)
    fused = copy.deepcopy(block)
    # The router is a plain Linear: the one-row GEMV takes it at 16-bit (float32 here keeps the matmul).
    assert fuse_layers(fused) == {"TritonSparseMoE": 1, "TritonMoEExperts": 1, "FusedLinear": 1}
    assert isinstance(fused, TritonSparseMoE)
    for n in (9, 1):  # the grouped GEMM, and the decode GEMV with silu-and-mul on load
        x = torch.randn(n, 32, device=DEVICE)
        torch.testing.assert_close(fused(x), block(x), atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 6),
    num_experts=st.sampled_from([3, 8, 60, 128]),
    top_k=st.integers(1, 8),
    renormalize=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fused_routing_matches_the_reference(
    n: int, num_experts: int, top_k: int, renormalize: bool, dtype: torch.dtype, seed: int
) -> None:
    """One kernel for softmax, top-k (largest first), renormalise and the rounding to ``dtype``."""
    top_k = min(top_k, num_experts)
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, num_experts, generator=gen) * 3).to(DEVICE)
    weights, ids = route_fused(logits, top_k, renormalize, dtype)
    want_weights, want_ids = route(logits, top_k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    assert torch.equal(ids, want_ids)
    # float32 sums may differ in the last place, which can flip a bfloat16 rounding: one bf16 step apart
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(weights.float(), want_weights, atol=1e-6, rtol=rtol)


def test_fused_routing_breaks_ties_toward_the_lower_expert() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0]], device=DEVICE)
    _, ids = route_fused(logits, 4, True, torch.float32)
    assert ids.tolist() == [[1, 3, 2, 4]]


@pytest.mark.parametrize(("n", "top_k", "hidden"), [(1, 8, 48), (3, 3, 200 + 5)])
def test_decode_gemv_sums_each_tokens_slots_in_its_launch(n: int, top_k: int, hidden: int) -> None:
    """The down GEMV's last slot to finish a column block adds the token's slot rows in slot order (the same
    bits as adding the rows it wrote one by one), and its counters are back at zero for the next call."""
    import kvik_cuda.moe as moe
    from kvik_cuda.gemv import completion_counters

    gen = torch.Generator().manual_seed(n * 100 + top_k)
    inter, num_experts = 40, 5
    act = torch.randn(n, 2 * inter, generator=gen).to(DEVICE)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen).to(DEVICE)
    ids = torch.randint(0, num_experts, (n * top_k,), generator=gen).to(DEVICE)
    scale = torch.rand(n * top_k, generator=gen).to(DEVICE)
    for _ in range(2):  # the second call finds the counters the first one left
        y = torch.empty(n * top_k, hidden, device=DEVICE)
        summed = torch.empty(n, hidden, device=DEVICE)
        a = act.repeat_interleave(top_k, dim=0)
        moe._pairwise_gemv(a, w2, y, ids, 1, scale=scale, silu_a=True, summed=summed, sum_slots=top_k)
        rows = y.view(n, top_k, hidden)
        in_order = rows[:, 0].clone()
        for slot in range(1, top_k):
            in_order += rows[:, slot]
        assert torch.equal(summed, in_order)
        assert int(completion_counters(y.device, 1).abs().sum()) == 0
