"""MoE routing on the GPU: softmax over the experts, the top k, renormalised (:func:`kvik.layers.moe.route`).

:func:`softmax_topk` is the routing of one token's row of logits inside a Triton program. Two kernels use it:
:func:`route_fused` (one program per token, after the router's GEMV) and the one-row router GEMV itself
(:func:`kvik_cuda.gemv.dense_gemv` with ``route=``), whose last program to finish runs it on the logits all
programs wrote, so a batch-1 MoE layer launches no routing kernel. Both see the same logits and run the same
code on one warp, so they give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Experts up to which routing runs as one kernel (the whole row of logits in one program).
ROUTE_MAX_EXPERTS = 1024


@triton.jit
def softmax_topk(logits, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):
    """``(weights [K_PAD] float32, ids [K_PAD] int64)`` of one token from its logits ``[E_PAD]`` (float32, padded
    with -inf): softmax in float32, the top ``TOP_K`` (largest first, the lower id on a tie), optionally
    renormalised; slots past ``TOP_K`` are padding."""
    offs = tl.arange(0, E_PAD)
    e = tl.exp(logits - tl.max(logits, 0))
    probs = e / tl.sum(e, 0)
    slots = tl.arange(0, K_PAD)
    weights = tl.zeros((K_PAD,), dtype=tl.float32)
    ids = tl.zeros((K_PAD,), dtype=tl.int64)
    for i in tl.static_range(TOP_K):
        best = tl.max(probs, 0)
        index = tl.min(tl.where(probs == best, offs, E_PAD), 0)  # the lowest id among equal maxima
        weights = tl.where(slots == i, best, weights)
        ids = tl.where(slots == i, index.to(tl.int64), ids)
        probs = tl.where(offs == index, -1.0, probs)  # probabilities are >= 0: never picked again
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 0)
    return weights, ids


@triton.jit
def store_route(weights_ptr, ids_ptr, row, weights, ids, TOP_K: tl.constexpr, K_PAD: tl.constexpr):
    """Token ``row``'s routing into ``weights [n, TOP_K]`` (in that tensor's dtype) and ``ids [n, TOP_K]``."""
    slots = tl.arange(0, K_PAD)
    keep = slots < TOP_K
    tl.store(weights_ptr + row * TOP_K + slots, weights.to(weights_ptr.dtype.element_ty), mask=keep)
    tl.store(ids_ptr + row * TOP_K + slots, ids, mask=keep)


@triton.jit
def _route_kernel(
    logits_ptr,  # [n, E]
    weights_ptr,  # [n, TOP_K] (float32, or the activations' dtype when the caller rounds)
    ids_ptr,  # [n, TOP_K] int64
    stride_l,
    E,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    """:func:`softmax_topk` in one program per token."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_PAD)
    x = tl.load(logits_ptr + row * stride_l + offs, mask=offs < E, other=-float("inf")).to(tl.float32)
    weights, ids = softmax_topk(x, TOP_K, K_PAD, E_PAD, RENORMALIZE)
    store_route(weights_ptr, ids_ptr, row, weights, ids, TOP_K, K_PAD)


def route_warps(num_experts: int) -> int:
    """Warps of a program that routes one token: the same for every kernel that routes, so they sum alike."""
    return 1 if triton.next_power_of_2(num_experts) <= 256 else 4


def route_outputs(n: int, top_k: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(weights [n, top_k] dtype, ids [n, top_k] int64)``."""
    return torch.empty((n, top_k), dtype=dtype, device=device), torch.empty(
        (n, top_k), dtype=torch.int64, device=device
    )


def route_fused(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvik.layers.moe.route` in one launch: ``(weights [n, top_k] dtype, ids [n, top_k] int64)``."""
    n, num_experts = router_logits.shape
    weights, ids = route_outputs(n, top_k, dtype, router_logits.device)
    _route_kernel[(n,)](
        router_logits,
        weights,
        ids,
        router_logits.stride(0),
        num_experts,
        TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k),
        E_PAD=triton.next_power_of_2(num_experts),
        RENORMALIZE=renormalize,
        num_warps=route_warps(num_experts),
    )
    return weights, ids
