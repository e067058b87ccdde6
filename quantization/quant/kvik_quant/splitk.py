"""Split-K for GEMV-shaped kernels without a second launch: the last program of a column tile adds the partials.

A decode-sized matmul (a few rows) has too few output tiles to occupy 132 SMs, so the
K dimension is split over ``SPLIT_K`` programs per tile. Each writes its float32 partial
to a scratch ``[SPLIT_K, M, N]`` buffer and increments the tile's counter; the program that
sees the count reach ``SPLIT_K - 1`` adds the partials **in split order** (so results are
deterministic, unlike ``atomic_add`` into the output), writes the output and resets the
counter to zero for the next call. One launch, no memset, CUDA-graph safe: the counters
live in a per-device buffer allocated once (before graph capture: the eager warm-up runs
the same shapes first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_counters: dict[tuple[str, int | None], torch.Tensor] = {}


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``tiles`` counters on ``device``, shared by every split-K call."""
    key = (device.type, device.index)
    buf = _counters.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


@triton.jit
def store_tile(
    acc,  # [BLOCK_M, BLOCK_N] float32, already scaled: the (partial) result of this program
    out_ptr,  # [M, N] output dtype
    part_ptr,  # [SPLIT_K, M, N] float32 scratch (unused when SPLIT_K == 1)
    lock_ptr,  # [>= tiles] int32 counters, zero between calls
    offs_m,
    offs_n,
    M,
    N,
    tile,  # this program's column-tile index (its counter)
    pid_k,
    SPLIT_K,
):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves (release below)
        count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT_K - 1:  # the last one in: everyone else's partial is visible now
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(0, SPLIT_K):  # fixed order: deterministic
                total += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next call


def split_for(tiles: int, k_tiles: int, num_sms: int, per_sm: int = 2, max_split: int = 16) -> int:
    """Smallest power-of-two split giving at least ``per_sm`` programs per SM (never more splits than k-tiles).

    More programs per SM keep more weight loads in flight (the GEMV is bound by bytes in flight per SM).
    """
    split = 1
    while tiles * split < per_sm * num_sms and split * 2 <= min(max_split, k_tiles):
        split *= 2
    return split


def pow2_divisor(limit: int, *values: int) -> int:
    """The largest power of two <= ``limit`` dividing every value: a k-tile that neither overhangs K nor
    straddles a quantization group (a per-channel group is all of K, which need not be a power of two)."""
    d = 1
    while d * 2 <= limit and all(v % (d * 2) == 0 for v in values):
        d *= 2
    return d


def scratch(split_k: int, m: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The partials buffer (a 1-element dummy when nothing is split): float32 sums, or int32 ones for an integer
    GEMM whose partials are added before they are rescaled."""
    if split_k == 1:
        return torch.empty(1, dtype=dtype, device=device)
    return torch.empty(split_k, m, n, dtype=dtype, device=device)


_sms: dict[tuple[str, int | None], int] = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (cached; 8 off CUDA, where it only shapes the interpreter's grid)."""
    key = (device.type, device.index)
    if key not in _sms:
        _sms[key] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return _sms[key]
