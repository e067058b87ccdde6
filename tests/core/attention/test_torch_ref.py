"""TorchRefAttentionBackend against naive dense attention over unpaged K/V."""

from __future__ import annotations

import random

import pytest
import torch
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.testing.conformance.attention import build_metadata, check_attention_backend


def naive_attention(
    q: torch.Tensor,  # [n_new, H, D]
    k: torch.Tensor,  # [L, KVH, D] the request's whole context
    v: torch.Tensor,
    scale: float,
    window: int | None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Dense attention of the last n_new positions, in float64, GQA by repeating kv heads."""
    n_new, heads, _ = q.shape
    ctx = k.shape[0]
    group = heads // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # [H, n_new, L]
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    q_pos = torch.arange(ctx - n_new, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_case(
    shapes: list[tuple[int, int]],  # per request: (cached tokens, new tokens)
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    window: int | None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    soft_cap: float | None = None,
    shuffle: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Write each request's cached prefix straight into a paged cache, run one step, return (out, expected, cache, data).
    ``shuffle``: blocks in random order (else consecutive, as a fresh pool hands them to one request)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = [-(-(c + n) // block_size) for c, n in shapes]
    ids = list(range(1, sum(need) + 1))
    if shuffle:
        rng.shuffle(ids)
    cache = torch.zeros(2, sum(need) + 1, block_size, num_kv_heads, head_size, dtype=dtype)
    flat_k = cache[0].view(-1, num_kv_heads, head_size)
    flat_v = cache[1].view(-1, num_kv_heads, head_size)
    tables, qs, ks, vs, full = [], [], [], [], []
    at = 0
    for (cached, new), n_blocks in zip(shapes, need, strict=True):
        table = ids[at : at + n_blocks]
        at += n_blocks
        ctx = cached + new
        k = torch.randn(ctx, num_kv_heads, head_size).to(dtype)
        v = torch.randn(ctx, num_kv_heads, head_size).to(dtype)
        q = torch.randn(new, num_heads, head_size).to(dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        flat_k[slots[:cached]] = k[:cached]
        flat_v[slots[:cached]] = v[:cached]
        tables.append(table)
        qs.append(q)
        ks.append(k[cached:])
        vs.append(v[cached:])
        full.append((q, k, v, slots))
    metadata = build_metadata([n for _, n in shapes], [c + n for c, n in shapes], tables, block_size)
    backend = TorchRefAttentionBackend(num_heads, head_size, num_kv_heads, head_size**-0.5, window, soft_cap)
    TorchRefAttentionBackend.prepare(metadata)
    out = backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, metadata)
    expected = torch.cat([naive_attention(q, k, v, head_size**-0.5, window, soft_cap) for q, k, v, _ in full])
    return out, expected, cache, full


MIXED = [(0, 9), (5, 1), (40, 1), (17, 6), (0, 1), (16, 16), (3, 1)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 4, 13])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_mixed_batch_matches_naive(num_heads: int, num_kv_heads: int, window: int | None, block_size: int) -> None:
    out, expected, _, _ = run_case(MIXED, num_heads, num_kv_heads, 32, block_size, window)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shapes",
    [
        [(0, 1)],  # a single one-token prompt
        [(0, 37)],  # one fresh prefill (is_causal fast path)
        [(3, 1), (30, 1), (1, 1), (12, 1)],  # decode only
        [(0, 5), (0, 12), (0, 2)],  # prefill only
        [(20, 7), (2, 30)],  # chunks over cached prefixes
    ],
)
@pytest.mark.parametrize("window", [None, 6])
def test_batch_shapes(shapes: list[tuple[int, int]], window: int | None) -> None:
    out, expected, _, _ = run_case(shapes, 4, 2, 16, 8, window, seed=3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("context", [1, 8, 45])
def test_a_single_streams_consecutive_blocks_are_read_in_place(context: int, window: int | None) -> None:
    """One decode request whose blocks are consecutive reads its K/V as a view of the cache, not a gather of
    its whole context: the same bits as the gather over the same values in shuffled blocks."""
    in_place, expected, _, _ = run_case([(context - 1, 1)], 4, 2, 16, 8, window, seed=5, shuffle=False)
    gathered, _, _, _ = run_case([(context - 1, 1)], 4, 2, 16, 8, window, seed=5, shuffle=True)
    assert torch.equal(in_place, gathered)
    torch.testing.assert_close(in_place.double(), expected, atol=1e-5, rtol=1e-5)
    blocks = -(-context // 8)
    consecutive = build_metadata([1], [context], [list(range(3, 3 + blocks))], 8)
    TorchRefAttentionBackend.prepare(consecutive)
    assert consecutive.backend_data["torch_ref"].decode_first_slot == 3 * 8
    if blocks > 1:  # out of order: gathered
        swapped = build_metadata([1], [context], [[4, 3, *range(5, 3 + blocks)]], 8)
        TorchRefAttentionBackend.prepare(swapped)
        assert swapped.backend_data["torch_ref"].decode_first_slot is None


def test_writes_new_kv_into_cache_slots() -> None:
    _, _, cache, full = run_case(MIXED, 4, 2, 16, 4, None)
    flat_k = cache[0].view(-1, 2, 16)
    flat_v = cache[1].view(-1, 2, 16)
    for _, k, v, slots in full:
        torch.testing.assert_close(flat_k[slots], k, atol=0, rtol=0)
        torch.testing.assert_close(flat_v[slots], v, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision(dtype: torch.dtype, tol: float) -> None:
    out, expected, _, _ = run_case(MIXED, 8, 2, 64, 16, 13, dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_odd_head_size() -> None:
    out, expected, _, _ = run_case(MIXED, 2, 1, 24, 4, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_forward_without_prepare_plans_itself() -> None:
    # prepare() is an optimisation shared across layers, not a precondition.
    torch.manual_seed(0)
    cache = torch.zeros(2, 4, 4, 1, 8)
    metadata = build_metadata([3], [3], [[2]], 4)
    q, k, v = torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    out = TorchRefAttentionBackend(2, 8, 1, 8**-0.5).forward(q, k, v, cache, metadata)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, 8**-0.5, None), atol=1e-6, rtol=1e-6)


def test_conformance_check_passes_for_the_reference() -> None:
    assert check_attention_backend(TorchRefAttentionBackend, head_sizes=(32,), heads=((4, 2),)) == 2


class _IgnoresWindow(TorchRefAttentionBackend):
    name = "broken_window"

    def __init__(self, num_heads, head_size, num_kv_heads, scale, sliding_window=None) -> None:
        super().__init__(num_heads, head_size, num_kv_heads, scale, None)


class _SkipsCacheWrite(TorchRefAttentionBackend):
    name = "broken_write"

    def forward(self, query, key, value, kv_cache, metadata):
        return super().forward(query, key, value, kv_cache.clone(), metadata)


class _Refuses(TorchRefAttentionBackend):
    name = "refuses"
    supported_head_sizes = (256,)


@pytest.mark.parametrize("broken,expect", [(_IgnoresWindow, "window=7"), (_SkipsCacheWrite, "step 2")])
def test_conformance_check_catches_broken_backends(broken: type, expect: str) -> None:
    with pytest.raises(AssertionError, match=expect):
        check_attention_backend(broken, head_sizes=(32,), heads=((4, 2),))


def test_conformance_check_refuses_to_pass_vacuously() -> None:
    with pytest.raises(AssertionError, match="rejected every configuration"):
        check_attention_backend(_Refuses, head_sizes=(32,))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_soft_capped_scores(window: int | None, heads: tuple[int, int]) -> None:
    """Gemma 2's attention soft-cap on prefill, cached-prefix and decode rows, with and without a window."""
    out, expected, _, _ = run_case(MIXED, heads[0], heads[1], 16, 4, window, soft_cap=0.5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    uncapped, _, _, _ = run_case(MIXED, heads[0], heads[1], 16, 4, window)
    assert not torch.allclose(out, uncapped, atol=1e-3)  # a cap of 0.5 changes these scores
