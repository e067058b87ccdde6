"""Top-k routing and the reference experts against a dense computation (every expert on every token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.layers.moe import MoEExperts, route


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    num_experts=st.integers(1, 8),
    top_k=st.integers(1, 8),
    renorm=st.booleans(),
    seed=st.integers(0, 999),
)
def test_route_keeps_the_top_k_probabilities(n: int, num_experts: int, top_k: int, renorm: bool, seed: int) -> None:
    top_k = min(top_k, num_experts)
    logits = torch.randn(n, num_experts, generator=torch.Generator().manual_seed(seed))
    weights, ids = route(logits, top_k, renorm)
    probs = logits.softmax(-1)
    assert ids.shape == weights.shape == (n, top_k) and weights.dtype == torch.float32
    assert torch.equal(ids, probs.topk(top_k, dim=-1).indices)
    expected = probs.gather(1, ids)
    if renorm:
        expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.sum(-1), torch.ones(n))
    torch.testing.assert_close(weights, expected)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 10), num_experts=st.integers(1, 6), top_k=st.integers(1, 3), seed=st.integers(0, 999))
def test_reference_experts_equal_the_dense_mixture(n: int, num_experts: int, top_k: int, seed: int) -> None:
    top_k = min(top_k, num_experts)
    gen = torch.Generator().manual_seed(seed)
    experts = MoEExperts(num_experts, 16, 24, torch.float64)
    experts.w13.data.normal_(generator=gen)
    experts.w2.data.normal_(generator=gen)
    x = torch.randn(n, 16, generator=gen, dtype=torch.float64)
    weights, ids = route(torch.randn(n, num_experts, generator=gen), top_k, renormalize=True)
    dense = torch.zeros(n, num_experts, dtype=torch.float64).scatter(1, ids, weights.double())  # [n, E]
    outs = []
    for e in range(num_experts):
        gate, up = F.linear(x, experts.w13[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, experts.w2[e]))
    want = torch.einsum("ne,enh->nh", dense, torch.stack(outs))
    torch.testing.assert_close(experts(x, weights, ids), want)


def test_dense_path_for_graph_capture_equals_the_sparse_one() -> None:
    gen = torch.Generator().manual_seed(0)
    experts = MoEExperts(5, 16, 24, torch.float64)
    experts.w13.data.normal_(generator=gen)
    experts.w2.data.normal_(generator=gen)
    x = torch.randn(9, 16, generator=gen, dtype=torch.float64)
    weights, ids = route(torch.randn(9, 5, generator=gen), 2, renormalize=False)
    torch.testing.assert_close(experts._dense(x, weights, ids, torch.zeros_like(x)), experts(x, weights, ids))
