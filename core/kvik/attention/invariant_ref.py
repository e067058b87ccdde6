"""Batch-invariant paged attention in plain PyTorch (the torch_ref backend's deterministic mode).

The default torch_ref path hands each step's rows to SDPA in shapes that depend on the
batch (decode rows padded to the longest context, a prefill chunk as one call), and SDPA's
kernels pick their blocking by shape, so a row's softmax is summed in a batch-dependent
order. Here every call has one fixed shape:

* a request's query rows go in blocks of ``BLOCK_Q`` tokens (padded), each block as
  ``[kv_heads, BLOCK_Q * group, head_size]``;
* keys go in tiles of ``BLOCK_N`` at *absolute* positions (tile ``t`` holds keys
  ``[t * BLOCK_N, (t + 1) * BLOCK_N)``), reduced in order with an online softmax in
  float32, exactly the flash-attention recurrence the Triton kernel runs.

A tile past a row's last visible key is fully masked: its ``p`` is exactly 0 and its
rescale factor exactly 1, so it leaves the row's running max, sum and accumulator as they
were. Which tiles a block visits (set by its other rows, or by where a prompt chunk starts)
therefore never changes a row's result, and a decode row takes the same path in a decode
step as in a mixed one. ``exp`` runs through :func:`kvik.layers.batch_invariant.pointwise`.

Python loops over requests, query blocks and key tiles: this is the CPU's correctness path
(and the reference for tests), not a fast one.
"""

from __future__ import annotations

import torch

from kvik.attention.backend import AttentionMetadata
from kvik.layers.batch_invariant import pointwise

BLOCK_Q = 16  # query tokens per block
BLOCK_N = 256  # keys per tile (fewer Python iterations; tests shrink it to cover several tiles)


def invariant_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size] (this step's K/V written)
    metadata: AttentionMetadata[torch.Tensor],
    num_kv_heads: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
    n_heads, d = query.shape[1], query.shape[2]
    group = n_heads // num_kv_heads
    k_cache = kv_cache[0].reshape(-1, num_kv_heads, d)  # [num_slots, kvh, D]
    v_cache = kv_cache[1].reshape(-1, num_kv_heads, d)
    bs = metadata.block_size
    out = torch.zeros_like(query)  # rows past the requests' (padding) stay 0
    start = 0
    for r, (q_len, seq_len) in enumerate(zip(metadata.query_lens_cpu, metadata.seq_lens_cpu, strict=True)):
        if q_len == 0:
            continue
        ctx = seq_len - q_len  # tokens cached before this step's rows
        tiles = -(-seq_len // BLOCK_N)
        # The request's keys in whole tiles; positions past seq_len read the last key (masked below).
        pos = torch.arange(tiles * BLOCK_N, device=query.device).clamp_(max=seq_len - 1)
        table = metadata.block_tables[r].long()
        slots = table[pos // bs] * bs + pos % bs
        keys = k_cache.index_select(0, slots).float().permute(1, 0, 2)  # [kvh, tiles * BLOCK_N, D]
        values = v_cache.index_select(0, slots).float().permute(1, 0, 2)
        for qb in range(0, q_len, BLOCK_Q):
            rows = min(BLOCK_Q, q_len - qb)
            q = query.new_zeros((BLOCK_Q, n_heads, d), dtype=torch.float32)
            q[:rows] = query[start + qb : start + qb + rows].float()
            q = q.view(BLOCK_Q, num_kv_heads, group, d).permute(1, 0, 2, 3).reshape(num_kv_heads, BLOCK_Q * group, d)
            q_pos = ctx + qb + torch.arange(BLOCK_Q, device=query.device).clamp_(max=rows - 1)
            q_pos = q_pos.repeat_interleave(group)[None, :, None]  # [1, BLOCK_Q * group, 1]
            acc = _attend_block(q, keys, values, q_pos, seq_len, scale, sliding_window, ctx + qb + rows - 1)
            o = acc.view(num_kv_heads, BLOCK_Q, group, d).permute(1, 0, 2, 3).reshape(BLOCK_Q, n_heads, d)
            out[start + qb : start + qb + rows] = o[:rows].to(out.dtype)
        start += q_len
    return out


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of values <= 0 with those below -80 (masked keys at -inf included) set to exactly 0.

    PyTorch's CPU ``exp`` takes a ~50-100x slower path for results that are denormal or 0, and
    the masked and far-below-max scores of attention are mostly that. Terms under ``e^-80``
    (1.8e-35) of the row's maximum change no float32 sum; the rule is per element, so the
    result still depends on nothing but the element.
    """
    tiny = x < -80.0
    return pointwise(torch.exp, x.clamp(min=-80.0)).masked_fill_(tiny, 0.0)


def _attend_block(
    q: torch.Tensor,  # [kvh, R, D] float32, R = BLOCK_Q * group
    keys: torch.Tensor,  # [kvh, L, D] float32, L a multiple of BLOCK_N
    values: torch.Tensor,
    q_pos: torch.Tensor,  # [1, R, 1] absolute positions
    seq_len: int,
    scale: float,
    window: int | None,
    last_pos: int,  # the block's last real row's position: tiles beyond it are invisible to all rows
) -> torch.Tensor:  # [kvh, R, D] float32
    kvh, n_rows, d = q.shape
    m = q.new_full((kvh, n_rows), float("-inf"))
    l_sum = q.new_zeros((kvh, n_rows))
    acc = q.new_zeros((kvh, n_rows, d))
    first = 0 if window is None else max(0, int(q_pos.min()) - window + 1) // BLOCK_N
    for t in range(first, last_pos // BLOCK_N + 1):
        k_t = keys[:, t * BLOCK_N : (t + 1) * BLOCK_N]  # [kvh, BLOCK_N, D]
        v_t = values[:, t * BLOCK_N : (t + 1) * BLOCK_N]
        s = torch.bmm(q, k_t.transpose(1, 2)) * scale  # [kvh, R, BLOCK_N]
        k_pos = torch.arange(t * BLOCK_N, (t + 1) * BLOCK_N, device=q.device)[None, None, :]
        visible = (k_pos <= q_pos) & (k_pos < seq_len)
        if window is not None:
            visible = visible & (q_pos - k_pos < window)
        s = s.masked_fill(~visible, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet: exp(-inf) = 0
        p = _exp(s - m_safe[..., None])
        alpha = torch.where(m_new == m, 1.0, _exp(m - m_safe))  # exactly 1 when nothing new was visible
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.bmm(p, v_t)
        m = m_new
    return acc / torch.where(l_sum > 0, l_sum, 1.0)[..., None]
