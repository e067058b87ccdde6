"""A one-row GEMV for dense 16-bit weights: ``y[N] = W[N, K] @ x[K]`` at decode batch 1.

cuBLAS reads the 8B's small projections at 60-85% of HBM bandwidth at one row (o_proj 12.5 µs against a
7.9 µs floor on the H200). Here a program is one warp and ``BLOCK_N`` weight rows: each thread loads eight
consecutive k of every row (16 bytes), so it reuses its eight x values for all ``BLOCK_N`` rows and keeps
``BLOCK_N x 8`` float32 partial sums in registers; the k-sum leaves the thread once, at the end (one
cross-lane reduction per program, not per step). Each loop iteration takes ``unroll`` k-steps so that their
loads are in flight together (one step's 1 KB per program is too little to cover HBM latency: 8B batch-1
decode went from 4.62 to 4.25 ms with four). K is split over programs until every SM has several; the last
program of a row block adds the partials in split order (deterministic) in the same launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvik_cuda.silu import silu_and_mul
from kvik_cuda.sms import num_sms


@dataclass(frozen=True, slots=True)
class DenseGemvConfig:
    # The least total time over the 8B's qkv / o / down and Qwen3-30B-A3B's qkv / o in the H200 sweep
    # (benchmarks/dense_gemv_probe.py, 2026-12-02 run m): 14.6 / 10.9 / 30.4 / 7.2 / 8.3 µs against the plain
    # loop's (2, 256, 16 per SM) 15.6 / 11.8 / 32.7 / 8.0 / 8.2 and cuBLAS's 16.6 / 13.3 / 32.2 / 8.1 / 9.5.
    block_n: int = 2  # weight rows per program
    block_k: int = 256  # k per step: 8 per thread x 32 lanes x num_warps
    per_sm: int = 8  # split K until this many programs per SM
    num_warps: int = 1
    # k-steps per loop iteration, each masked on its own (so any trip count is right): their loads are in
    # flight together, where a plain loop waits for each step's before issuing the next.
    unroll: int = 4


# Weights with no more rows than columns (the 8B's o and down, Qwen3-30B-A3B's o): one row a program, eight
# k-steps in flight. H200 sweep (run r, 2026-12-02): Qwen3-30B-A3B's o 6.61 µs against the default's 7.48
# (whose 1,024 row blocks split K in two and pay the completion path), the 8B's o 10.44 against 10.97; taller
# weights (the MoE's qkv) lose with it (7.25 against 7.06).
WIDE_CONFIG = DenseGemvConfig(block_n=1, block_k=256, per_sm=8, num_warps=1, unroll=8)


def config_for(n: int, k: int) -> DenseGemvConfig:
    """The config :func:`dense_gemv` uses for a ``[n, k]`` weight when none is given."""
    return WIDE_CONFIG if n <= k else DenseGemvConfig()


@triton.jit
def last_to_arrive(lock_ptr, arrivals):
    """Count this program in at ``lock_ptr``; True for the last of ``arrivals`` programs, which then sees every
    other program's stores (release / acquire at GPU scope) and must put the counter back to 0 (``reset``)."""
    tl.debug_barrier()  # every thread's stores are issued before the counter moves (release below)
    return tl.atomic_add(lock_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1


@triton.jit
def reset(lock_ptr):
    """The counter back at zero, ready for the next call."""
    tl.atomic_xchg(lock_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _dense_gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K], K contiguous
    out_ptr,  # [N]
    part_ptr,  # [SPLIT_K, N] float32
    lock_ptr,  # [>= row blocks] int32, zero between calls
    N,
    K,
    stride_wn,
    SPLIT_K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,
    GATED: tl.constexpr,  # W is [gate; up], each N rows: out[N] = silu(gate @ x) * (up @ x)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * per_split
    k_hi = tl.minimum(K, k_lo + per_split)
    part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    part_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # GATED: the up rows (unused otherwise)
    # Unrolled by hand, not with tl.range's loop_unroll_factor: Triton 3.6 miscomputes that loop's remainder on
    # the GPU (a 5-step loop unrolled by 4 gave garbage on the H200, right under the interpreter). The k order
    # of each lane's sums is the plain loop's, so every unroll gives the same bits.
    for k0 in range(k_lo, k_hi, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):
            ks = k0 + u * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ks < k_hi
            w_rows = w_ptr + rows[:, None] * stride_wn + ks[None, :]
            w = tl.load(w_rows, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            part += w.to(tl.float32) * x
            if GATED:
                w_up = tl.load(w_rows + N * stride_wn, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                part_up += w_up.to(tl.float32) * x
    acc = tl.sum(part, axis=1)
    acc_up = tl.sum(part_up, axis=1)
    if SPLIT_K > 1:
        # Partials [SPLIT_K, N] (GATED: [SPLIT_K, 2N], the up rows after the gate rows).
        width = 2 * N if GATED else N
        tl.store(part_ptr + pid_k * width + rows, acc, mask=row_ok)
        if GATED:
            tl.store(part_ptr + pid_k * width + N + rows, acc_up, mask=row_ok)
        if last_to_arrive(lock_ptr + pid_n, SPLIT_K):  # everyone else's partial is visible now
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s in range(0, SPLIT_K):  # fixed order: deterministic
                acc += tl.load(part_ptr + s * width + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(part_ptr + s * width + N + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            _store_rows(out_ptr, rows, row_ok, acc, acc_up, GATED)
            reset(lock_ptr + pid_n)
    else:
        _store_rows(out_ptr, rows, row_ok, acc, acc_up, GATED)


@triton.jit
def _store_rows(out_ptr, rows, row_ok, acc, acc_up, GATED: tl.constexpr):
    """The finished row sums, or with GATED ``silu(gate) * up`` rounded where the eager modules round: the two
    projections' outputs, then :func:`kvik_cuda.silu.silu_and_mul` (what the SiLU-and-mul kernel applies)."""
    ty = out_ptr.dtype.element_ty
    if GATED:
        gate, up = acc.to(ty).to(tl.float32), acc_up.to(ty).to(tl.float32)
        tl.store(out_ptr + rows, silu_and_mul(gate, up, ty), mask=row_ok)
    else:
        tl.store(out_ptr + rows, acc.to(ty), mask=row_ok)


_counters: dict[tuple[str, str, int | None], torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown counter buffers: a captured CUDA graph may still point at one


def completion_counters(device: torch.device, blocks: int, pool: str = "model") -> torch.Tensor:
    """Zeroed int32 counters for kernels whose last program to finish a block of outputs completes it (this
    GEMV's split-K sum, the MoE decode GEMV's slot sum, the LoRA shrink's split sum). Shared by every such
    call on ``device`` that names the same ``pool``: a forward's calls run one after another on one stream,
    and each kernel puts its counters back to zero (LoRA kernels have a pool of their own, in case one runs
    beside the base model's on a side stream). Sized for a 262k vocabulary's head at two rows a block, so a
    model rarely outgrows it."""
    key = (pool, device.type, device.index)
    buf = _counters.get(key)
    if buf is None or buf.numel() < blocks:
        if buf is not None:
            _retired.append(buf)
        buf = torch.zeros(max(blocks, 1 << 17), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


def split_for(blocks: int, k_steps: int, num_sms: int, per_sm: int, max_split: int = 32) -> int:
    """Smallest power-of-two split of K giving ``per_sm`` programs per SM (never more splits than k-steps)."""
    split = 1
    while blocks * split < per_sm * num_sms and split * 2 <= min(max_split, k_steps):
        split *= 2
    return split


def dense_gemv(
    x: torch.Tensor, weight: torch.Tensor, config: DenseGemvConfig | None = None, *, gated: bool = False
) -> torch.Tensor:
    """``x @ weight.T`` for one row ``x`` ``[1, K]`` (or ``[K]``) and ``weight`` ``[N, K]``, in ``x``'s dtype.

    ``gated``: ``weight`` is a merged ``[gate; up]`` projection (``[2I, K]``) and the result is
    ``silu(x @ gate.T) * (x @ up.T)`` ``[..., I]``, each program computing a gate row and its up row together,
    so the activation costs no launch of its own (the same bits as the projection followed by
    ``FusedSiluAndMul``: every row's sum runs in the same order)."""
    n, k = weight.shape
    cfg = config or config_for(n, k)
    if gated:
        assert n % 2 == 0, "a gated weight stacks gate and up rows of one size"
        n //= 2
    x1 = x.reshape(-1)
    assert x1.numel() == k and weight.stride(1) == 1
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(n, cfg.block_n)
    # The split the plain product of all of weight's rows takes, so that gated rows sum in the same order.
    split = split_for(triton.cdiv(weight.shape[0], cfg.block_n), triton.cdiv(k, cfg.block_k), num_sms(x.device),
                      cfg.per_sm)  # fmt: skip
    width = 2 * n if gated else n
    part = torch.empty((split, width) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    _dense_gemv_kernel[(blocks, split)](
        x1.contiguous(), weight, out, part, completion_counters(x.device, blocks), n, k, weight.stride(0), split,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UNROLL=cfg.unroll, GATED=gated, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)
