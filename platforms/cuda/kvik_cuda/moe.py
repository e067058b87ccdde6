"""Fused mixture-of-experts on the GPU: grouped GEMMs over tokens sorted by expert (Triton).

The core's :class:`~kvik.layers.moe.MoEExperts` runs one pair of matmuls per
expert (a host sync and ~4 launches per expert per layer). Here the routed
(token, slot) pairs are sorted by expert on the device and padded to whole
``BLOCK_M`` tiles, so that every tile of rows belongs to one expert; then each
projection is one launch over all experts:

1. ``gate_up = x[token] @ w13[e].T`` for every routed pair (rows in pair order);
2. ``act = silu(gate) * up`` (eager, as the reference rounds it; the decode GEMV below computes it
   as it loads ``gate_up``);
3. ``y = act @ w2[e].T * routing_weight``, then the ``top_k`` rows of each token are summed (the decode
   GEMV sums them in its own launch: the last slot to finish a column block adds all of them).

Sorting uses a fixed upper bound on the padded length (``n * top_k + E * (BLOCK_M - 1)``)
and no host sync, so the step can be captured in a CUDA graph.

Decode-sized steps (at most :data:`PAIRWISE_MAX_PAIRS` routed pairs) skip the sort: one
program per (pair, block of outputs) reads its pair's expert id and does a GEMV against
that expert's weights. On the H200 the sort's ~15 small launches per layer cost more than
the expert GEMMs at batch 1 (Qwen3-30B-A3B: 9.2 ms/token against a 1.4 ms weight floor),
and with few pairs each expert's weights are read about once anyway.

The routing (softmax, top-k, renormalise, round: :func:`kvik.layers.moe.route`, about six
launches eagerly) is one kernel in :class:`TritonSparseMoE`.
:func:`kvik_cuda.fused.fuse_layers` swaps ``MoEExperts`` for :class:`TritonMoEExperts` and
``SparseMoE`` for :class:`TritonSparseMoE`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from kvik.layers.moe import MoEExperts, SparseMoE

from kvik_cuda.gemv import completion_counters, last_to_arrive, reset


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [rows of A, K]
    w_ptr,  # [E, N, K]
    c_ptr,  # [num_pairs, N]
    scale_ptr,  # [num_pairs] routing weights (read only when MUL_WEIGHT)
    sorted_ptr,  # [padded] int32 pair ids grouped by expert; num_pairs marks padding
    block_expert_ptr,  # [padded // BLOCK_M] int32 expert of each row tile; -1: unused tile
    N,
    K,
    num_pairs,
    a_row_div,  # pair id // a_row_div = row of A (top_k for the token input, 1 for pair rows)
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_cm,
    MUL_WEIGHT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pairs < num_pairs
    a_rows = pairs // a_row_div
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc += tl.dot(a, w, input_precision=PRECISION)
    if MUL_WEIGHT:
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds y before weighting
        scale = tl.load(scale_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    tl.store(
        c_ptr + pairs[:, None] * stride_cm + cols[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )


@triton.jit
def _pairwise_gemv_kernel(
    a_ptr,  # [rows of A, K], or with SILU_A [rows, 2 * K]: gate | up, activated on load
    w_ptr,  # [E, N, K]
    c_ptr,  # [num_pairs, N]
    scale_ptr,  # [num_pairs] routing weights (read only when MUL_WEIGHT)
    ids_ptr,  # [num_pairs] expert of each routed pair
    sum_ptr,  # [num_pairs // SUM_SLOTS, N] (written only when SUM_SLOTS)
    lock_ptr,  # [num_pairs // SUM_SLOTS * column blocks] int32, zero between calls (used only when SUM_SLOTS)
    N,
    K,
    a_row_div,  # pair id // a_row_div = row of A
    stride_am,
    stride_we,
    stride_wn,  # K is contiguous (stride 1): the weight rows load as wide vectors
    stride_cm,
    MUL_WEIGHT: tl.constexpr,
    SUM_SLOTS: tl.constexpr,  # > 0: each run of SUM_SLOTS pairs is one token's slots; sum them into sum_ptr
    SILU_A: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    REDUCE_ONCE: tl.constexpr,  # accumulate a [BLOCK_N, BLOCK_K] register tile, reduced across lanes at the end
):
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    row = pair // a_row_div
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + row * stride_am + ks, mask=k_ok, other=0.0)
        if SILU_A:  # act = silu(gate) * up, rounded where the eager reference rounds (after silu, after *)
            up = tl.load(a_ptr + row * stride_am + K + ks, mask=k_ok, other=0.0).to(tl.float32)
            gate = a.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(a_ptr.dtype.element_ty).to(tl.float32)
            a = (silu * up).to(a_ptr.dtype.element_ty)
        w = tl.load(
            w_ptr + expert * stride_we + cols[:, None] * stride_wn + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if REDUCE_ONCE:  # no cross-lane shuffles in the loop (kvik_cuda.gemv's layout)
            part += w.to(tl.float32) * a.to(tl.float32)[None, :]
        else:
            acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
    if REDUCE_ONCE:
        acc = tl.sum(part, axis=1)
    if MUL_WEIGHT:
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds y before weighting
        acc = acc * tl.load(scale_ptr + pair).to(tl.float32)
    tl.store(c_ptr + pair * stride_cm + cols, acc.to(c_ptr.dtype.element_ty), mask=col_ok)
    if SUM_SLOTS > 0:  # the last of a token's slots to finish this column block adds them (one launch, no summing kernel)
        token = pair // SUM_SLOTS
        lock = lock_ptr + token * tl.num_programs(1) + tl.program_id(1)
        if last_to_arrive(lock, SUM_SLOTS):  # every other slot's row is visible now
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s in range(0, SUM_SLOTS):  # slot order, in float32, rounded once (as the reference's sum rounds)
                y = tl.load(c_ptr + (token * SUM_SLOTS + s) * stride_cm + cols, mask=col_ok, other=0.0,
                            cache_modifier=".cg")  # fmt: skip
                total += y.to(tl.float32)
            tl.store(sum_ptr + token * N + cols, total.to(sum_ptr.dtype.element_ty), mask=col_ok)
            reset(lock)


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
    """Softmax over experts in float32, the top ``TOP_K`` (largest first, the lower id on a tie),
    optionally renormalised: :func:`kvik.layers.moe.route` in one program per token."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_PAD)
    x = tl.load(logits_ptr + row * stride_l + offs, mask=offs < E, other=-float("inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, 0))
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
    keep = slots < TOP_K
    tl.store(weights_ptr + row * TOP_K + slots, weights.to(weights_ptr.dtype.element_ty), mask=keep)
    tl.store(ids_ptr + row * TOP_K + slots, ids, mask=keep)


# Routed pairs (tokens x top_k) up to which a step takes the sort-free GEMV path: a decode
# batch of 8 tokens under top-8 routing. Beyond it the grouped GEMM's tensor-core tiles win,
# since several pairs share each expert and a GEMV would re-read its weights per pair.
PAIRWISE_MAX_PAIRS = 64
# Experts up to which routing runs as one kernel (the whole row of logits in one program).
ROUTE_MAX_EXPERTS = 1024


def gemv_config(n_out: int, k_in: int) -> tuple[int, int, int, bool]:
    """(BLOCK_N, BLOCK_K, num_warps, reduce_once) of the pairwise GEMV for an expert weight [n_out, k_in]
    (benchmarks/moe_gemv_sweep.py times the alternatives)."""
    # H200, Qwen3-30B-A3B's gate_up [1536, 2048] and down [2048, 768] at 8 pairs: (16, 256, 4) is within
    # 1% of each shape's best and 15% faster than (32, 128, 4) (run f in docs/benchmarks.md). The
    # reduce-once, one-warp tiles (the dense GEMV's layout) and a hand-unrolled k-loop (kvik_cuda.gemv's) were
    # no better in runs i and o.
    return 16, min(256, triton.next_power_of_2(max(16, k_in))), 4, False


def _pairwise_gemv(
    a: torch.Tensor,  # [rows, K] (with silu_a: [rows, 2 * K])
    w: torch.Tensor,  # [E, N, K]
    out: torch.Tensor,  # [num_pairs, N]
    expert_ids: torch.Tensor,  # [num_pairs]
    a_row_div: int,
    scale: torch.Tensor | None = None,
    silu_a: bool = False,
    summed: torch.Tensor | None = None,  # [num_pairs // sum_slots, N]: out's runs of sum_slots rows, added
    sum_slots: int = 0,
) -> None:
    n_out, k_in = w.shape[1], w.shape[2]
    block_n, block_k, warps, reduce_once = gemv_config(n_out, k_in)
    col_blocks = triton.cdiv(n_out, block_n)
    locks = completion_counters(out.device, out.shape[0] * col_blocks) if sum_slots else out
    _pairwise_gemv_kernel[(out.shape[0], col_blocks)](
        a,
        w,
        out,
        scale if scale is not None else out,
        expert_ids,
        summed if summed is not None else out,
        locks,
        n_out,
        k_in,
        a_row_div,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        MUL_WEIGHT=scale is not None,
        SUM_SLOTS=sum_slots,
        SILU_A=silu_a,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        REDUCE_ONCE=reduce_once,
        num_warps=warps,
    )


def route_fused(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvik.layers.moe.route` in one launch: ``(weights [n, top_k] dtype, ids [n, top_k] int64)``."""
    n, num_experts = router_logits.shape
    weights = torch.empty((n, top_k), dtype=dtype, device=router_logits.device)
    ids = torch.empty((n, top_k), dtype=torch.int64, device=router_logits.device)
    e_pad = triton.next_power_of_2(num_experts)
    _route_kernel[(n,)](
        router_logits,
        weights,
        ids,
        router_logits.stride(0),
        num_experts,
        TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k),
        E_PAD=e_pad,
        RENORMALIZE=renormalize,
        num_warps=1 if e_pad <= 256 else 4,
    )
    return weights, ids


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group routed pairs by expert, each group padded to whole ``block_m`` tiles (no host sync).

    ``topk_ids``: [n, top_k]. Returns ``(sorted_pairs [P] int32, tile_expert [P // block_m] int32)``
    with ``P = n * top_k + E * (block_m - 1)`` rounded up to ``block_m``; padding pairs hold
    ``n * top_k`` and unused tiles expert -1.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    group_start = torch.cumsum(padded, 0) - padded  # [E] first padded row of each expert
    order = torch.argsort(flat, stable=True)  # pair ids by expert
    experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[experts]
    total = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_pairs = torch.full((total,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[group_start[experts] + rank] = order.to(torch.int32)
    tile_end = torch.cumsum(padded // block_m, 0)  # [E] tiles up to and including each expert
    tiles = torch.arange(total // block_m, device=device)
    tile_expert = torch.searchsorted(tile_end, tiles, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return sorted_pairs, tile_expert


def _grouped_gemm(
    a: torch.Tensor,  # [rows, K]
    w: torch.Tensor,  # [E, N, K]
    out: torch.Tensor,  # [num_pairs, N]
    sorted_pairs: torch.Tensor,
    tile_expert: torch.Tensor,
    a_row_div: int,
    block_m: int,
    scale: torch.Tensor | None = None,
) -> None:
    n_out, k_in = w.shape[1], w.shape[2]
    block_n = 64 if n_out >= 64 else 32
    block_k = 64 if k_in >= 64 else 32
    grid = (tile_expert.numel(), triton.cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        a,
        w,
        out,
        scale if scale is not None else out,
        sorted_pairs,
        tile_expert,
        n_out,
        k_in,
        out.shape[0],
        a_row_div,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        MUL_WEIGHT=scale is not None,
        # float32 stays IEEE (the reference is exact float32); 16-bit: Triton's default (the
        # option only concerns float32, and backends differ in which values they accept).
        PRECISION="ieee" if a.dtype == torch.float32 else None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


class TritonMoEExperts(MoEExperts):
    """:class:`MoEExperts` with one grouped-GEMM launch per projection."""

    def forward(
        self,
        x: torch.Tensor,  # [n, hidden]
        topk_weights: torch.Tensor,  # [n, top_k] float32 or x.dtype
        topk_ids: torch.Tensor,  # [n, top_k] int64
    ) -> torch.Tensor:  # [n, hidden]
        n, top_k = topk_ids.shape
        if n == 0 or x.stride(-1) != 1:
            return super().forward(x, topk_weights, topk_ids)
        inter = self.intermediate_size
        gate_up = torch.empty(n * top_k, 2 * inter, dtype=x.dtype, device=x.device)
        y = torch.empty(n * top_k, self.hidden_size, dtype=x.dtype, device=x.device)
        weights = topk_weights.reshape(-1)
        decode = n * top_k <= PAIRWISE_MAX_PAIRS and self.w13.stride(2) == 1 and self.w2.stride(2) == 1
        if decode:  # no sort: one GEMV program row per routed pair
            ids = topk_ids.reshape(-1)
            _pairwise_gemv(x, self.w13, gate_up, ids, top_k)
            out = torch.empty(n, self.hidden_size, dtype=x.dtype, device=x.device)
            # silu(gate) * up on load; each token's top_k rows of y summed into out in the same launch
            _pairwise_gemv(gate_up, self.w2, y, ids, 1, scale=weights, silu_a=True, summed=out, sum_slots=top_k)
            return out
        # Small tiles for decode-sized batches (few pairs per expert), larger for prefill.
        block_m = 16 if n * top_k <= 4 * self.num_experts * 16 else 64
        sorted_pairs, tile_expert = sort_by_expert(topk_ids, self.num_experts, block_m)
        _grouped_gemm(x, self.w13, gate_up, sorted_pairs, tile_expert, top_k, block_m)
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        # Scaled in float32 from weights already rounded as the caller chose (SparseMoE.round_weights).
        _grouped_gemm(act, self.w2, y, sorted_pairs, tile_expert, 1, block_m, scale=weights)
        return y.view(n, top_k, -1).sum(dim=1)


class TritonSparseMoE(SparseMoE):
    """:class:`SparseMoE` whose routing (softmax, top-k, renormalise, round) is one kernel: eagerly
    it is about six launches per layer, which at batch 1 cost more than the router's GEMV."""

    def route(self, router_logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n, num_experts = router_logits.shape
        if n == 0 or router_logits.stride(-1) != 1 or num_experts > ROUTE_MAX_EXPERTS:
            return super().route(router_logits, dtype)
        return route_fused(router_logits, self.top_k, self.renormalize, dtype if self.round_weights else torch.float32)
