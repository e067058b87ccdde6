"""Triton kernels over kvik's paged KV cache.

Cache layout (one layer): ``[2, num_blocks, block_size, num_kv_heads, head_size]``;
token ``t`` of a request lives at slot ``block_table[t // block_size] * block_size
+ t % block_size``. Queries are the step's flattened mixed batch
``[num_tokens, num_heads, head_size]``; request ``r`` owns rows
``query_start_loc[r]:query_start_loc[r+1]`` and its context is ``seq_lens[r]``
tokens, the last ``query_len`` of which are the new rows.

One program of :func:`paged_attention_kernel` owns ``BLOCK_Q`` query tokens of
one request and *all* ``G = num_heads // num_kv_heads`` query heads that share
one KV head, i.e. a ``BLOCK_M = BLOCK_Q * G`` row tile, so every K/V tile it
reads is used by G heads (GQA-aware: K/V bytes are read once per group, not
once per head). Softmax is computed online (running max/sum in fp32, base 2).

Programs are laid out without any host-side plan: request ``r``'s query
blocks start at program ``query_start_loc[r] // BLOCK_Q + r`` (an upper bound
on the blocks before it), so the grid is ``num_tokens // BLOCK_Q + num_reqs``
and a program finds its request by binary search; spare programs exit. All
sizes come from device tensors, which keeps the kernels CUDA-graph safe.

The split-KV (flash-decoding) variant adds a grid axis over ``NUM_SPLITS``
slices of each request's KV range; each slice writes a normalised partial
output plus its running max and sum, and :func:`reduce_splits_kernel`
combines them. It pays off when ``num_reqs * num_kv_heads`` programs alone
cannot fill the GPU (small-batch decode over long contexts).

A step's new K/V rows reach the cache through :func:`write_kv_kernel` before attention, except in a
decode-only step (one new row per request) with a 16/32-bit cache: the attention program whose KV tiles
hold a request's new row stores it for its KV head (``WRITE_KV``) and, after a barrier, reads it back like any other key. No other
program reads that slot in such a step (a request's earlier splits end before it), so this is race-free,
and it saves a launch per layer of every decode step. Such a step can also hand over q and k before their
rotary embedding and per-head RMSNorms (``ROTARY``, ``QK_NORM``): each program rotates its own query rows,
and the writing program the new key before storing it, which saves the rotary kernel's launch too.

FP8 cache (``kv_cache_dtype="fp8"``): the cache holds float8 e4m3 ``x / scale`` with one
K and one V scale per layer. :func:`write_kv_kernel` quantizes (and builds the e4m3 bits
itself, see :func:`_e4m3_bits`); the attention kernel loads FP8 tiles, widens them in
registers (exact: every e4m3 value is an fp16 value; a bf16 model's dots then run in fp16,
whose widening is one instruction per pair) and folds the scales into the softmax scale (K)
and the final normalisation (V), so dequantizing costs no extra pass over the tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, pid, BLOCK_Q: tl.constexpr):
    """Largest r with query_start_loc[r] // BLOCK_Q + r <= pid (binary search)."""
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _rotate_rows(src, x, mask, offs_d, cos_src, sin_src, w_ptr, eps, HEAD_SIZE: tl.constexpr, NORM: tl.constexpr):
    """Rows ``x`` [R, HEAD_PAD] (loaded from pointers ``src`` under ``mask``) rotated by rotate_half with
    per-row ``cos``/``sin`` at ``cos_src``/``sin_src`` (pointers like ``src``); with NORM each row is first
    RMS-normalised and scaled by the weight at ``w_ptr``. Every step rounds to x's dtype where the eager
    modules do (``RotaryInputs``). A row's other half comes from a second load of the same (cached) bytes
    rather than from a register shuffle, which Triton has no cheap form of."""
    HALF: tl.constexpr = HEAD_SIZE // 2
    first = offs_d < HALF
    shift = tl.where(first, HALF, -HALF)  # x[partner] with partner = d + HALF or d - HALF
    y = tl.load(src + shift[None, :], mask=mask, other=0.0)
    ty = x.dtype
    if NORM:
        f = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(f * f, 1) / HEAD_SIZE + eps)[:, None]
        d_ok = offs_d < HEAD_SIZE
        w = tl.load(w_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        w_partner = tl.load(w_ptr + offs_d + shift, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        x = (w * (f * rstd).to(ty).to(tl.float32)).to(ty)
        y = (w_partner * (y.to(tl.float32) * rstd).to(ty).to(tl.float32)).to(ty)
    cos = tl.load(cos_src, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_src, mask=mask, other=0.0).to(tl.float32)
    a = (x.to(tl.float32) * cos).to(ty).to(tl.float32)
    b = (tl.where(first, -1.0, 1.0)[None, :] * y.to(tl.float32) * sin).to(ty).to(tl.float32)
    return (a + b).to(ty)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, t, q_pos, kv_end, bt_row, k_cache_ptr, v_cache_ptr, kv_head, stride_kb, stride_ks,
                 stride_kh, offs_d, d_ok, scale_log2, SLIDING_WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
                 BLOCK_N: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, V_CHUNK: tl.constexpr):  # fmt: skip
    """One KV tile of the online softmax. ``MASKED``: the tile may hold keys past ``kv_end``, after a row's
    position (causal) or outside its window; unmasked, every key of it is visible to every row.
    ``V_CHUNK`` > 0: the cache stores each block's V as [kv_heads, head_size, block_size] (FP8 caches), read in
    runs of ``V_CHUNK`` keys (a power of two dividing both BLOCK_N and the block size)."""
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < kv_end
    if MASKED:
        blk = tl.load(bt_row + offs_n // KV_BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // KV_BLOCK_SIZE).to(tl.int64)
    kv_off = blk * stride_kb + (offs_n % KV_BLOCK_SIZE) * stride_ks + kv_head * stride_kh
    if MASKED or HEAD_PAD != HEAD_SIZE:
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None])
    k = k.to(q.dtype)  # no-op for a model-dtype cache; FP8 widens exactly
    s = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], scaled below
    scale = scale_log2
    if SOFT_CAP > 0:
        # s * scale is x * log2(e); cap x itself. tanh(y) = 1 - 2 / (e^{2y} + 1) saturates to +-1
        # without overflow trouble (e^{2y} -> inf or 0), and needs only exp2.
        s = s * scale_log2
        y2 = s * (2.0 / SOFT_CAP)  # 2y in the log2 domain: 2 * (x / cap) * log2(e)
        s = (1.0 - 2.0 / (tl.math.exp2(y2) + 1.0)) * (SOFT_CAP * 1.4426950408889634)
        scale = 1.0
    if MASKED:
        visible = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if SLIDING_WINDOW > 0:
            visible = visible & (q_pos[:, None] - offs_n[None, :] < SLIDING_WINDOW)
        s = tl.where(visible, s, float("-inf"))
    # The scale applies after the mask, in an explicit FMA: a masked and an unmasked tile then run the same
    # arithmetic on a visible score. Left to the compiler, `s * scale - m` contracts into an FMA only where no
    # `where` stands between the two (unmasked tiles), and a row's bits would depend on which tiles its
    # query block happens to see whole. (The max commutes with the positive scale: rounding is monotone.)
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    # Rows that have seen no visible key yet keep m = -inf; shift them by 0
    # so exp2 gives 0 instead of NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(tl.fma(s, scale, -m_safe[:, None]))
    # Exactly 1 when the max did not move (a tile with nothing visible to the row, visited
    # because of other rows or where a chunk starts): such a tile must leave the row's
    # sum and accumulator bit-identical (deterministic mode relies on it), whatever exp2(0) rounds to.
    alpha = tl.where(m_new == m_i, 1.0, tl.math.exp2(m_i - m_safe))
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_CHUNK > 0:
        # P @ V sums over keys. With keys contiguous in the cache, the dot's operand reads 4 of them in one 32-bit
        # shared load; with V stored like K it took one byte-wide load per value (Hopper has no 8-bit transposing
        # ldmatrix). The tile is loaded as [head, chunks, chunk]: a chunk's keys share one cache block, so the
        # copy provably moves 16 contiguous bytes at a time (key by key, the block-table lookup per key hides
        # that). Chunks wholly past kv_end read zeros; the keys past kv_end inside a partly valid chunk are read
        # as they are, which is safe because their P is exactly 0 and an FP8 cache holds no NaN byte (it is
        # allocated zeroed and write_kv_kernel saturates every value, NaN included, to a finite e4m3).
        first = t * BLOCK_N + tl.arange(0, BLOCK_N // V_CHUNK) * V_CHUNK  # each chunk's first key
        chunk_ok = first < kv_end
        chunk_blk = tl.load(bt_row + first // KV_BLOCK_SIZE, mask=chunk_ok, other=0).to(tl.int64)
        base = chunk_blk * stride_kb + kv_head * (HEAD_SIZE * KV_BLOCK_SIZE) + first % KV_BLOCK_SIZE
        v3 = tl.load(v_cache_ptr + base[None, :, None] + (offs_d * KV_BLOCK_SIZE)[:, None, None]
                     + tl.arange(0, V_CHUNK)[None, None, :], mask=chunk_ok[None, :, None] & d_ok[:, None, None],
                     other=0.0)  # fmt: skip
        v = tl.trans(tl.reshape(v3, [HEAD_PAD, BLOCK_N]))
    elif MASKED or HEAD_PAD != HEAD_SIZE:
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :])
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["num_reqs"])
def paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size] (cache[0])
    v_cache_ptr,  # same shape and strides (cache[1])
    out_ptr,  # NUM_SPLITS == 1: [num_tokens, num_heads, head_size]; else fp32 [num_tokens, num_heads, NUM_SPLITS, HEAD_PAD]
    part_m_ptr,  # fp32 [num_tokens, num_heads, NUM_SPLITS] running max (log2 domain); unused when NUM_SPLITS == 1
    part_l_ptr,  # fp32 [num_tokens, num_heads, NUM_SPLITS] running sum; unused when NUM_SPLITS == 1
    block_tables_ptr,  # [num_reqs, max_blocks] int32
    seq_lens_ptr,  # [num_reqs] int32
    query_start_loc_ptr,  # [num_reqs + 1] int32
    key_ptr,  # WRITE_KV: this step's new K rows [num_tokens, num_kv_heads, head_size] (else unused)
    value_ptr,  # WRITE_KV: the new V rows
    slot_mapping_ptr,  # WRITE_KV: [num_tokens] int64 cache slots of the new rows; negative: skip
    cos_ptr,  # ROTARY: [num_tokens, head_size] (else unused)
    sin_ptr,  # ROTARY: [num_tokens, head_size]
    q_norm_ptr,  # QK_NORM: [head_size] per-head RMSNorm weight of q
    k_norm_ptr,  # QK_NORM: of k
    q_norm_eps,
    k_norm_eps,
    scale_log2,  # softmax scale * log2(e) (* k_scale for an FP8 cache)
    v_scale,  # the FP8 cache's V scale (1.0 otherwise): out = v_scale * softmax(s) @ v
    num_reqs,
    num_heads,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    stride_kt,  # of key_ptr / value_ptr (WRITE_KV)
    stride_kvh,
    stride_vt,
    stride_vvh,
    stride_ct,  # of cos_ptr / sin_ptr (ROTARY)
    stride_st,
    G: tl.constexpr,  # query heads per KV head
    SLIDING_WINDOW: tl.constexpr,  # 0: none; else a key at position p is visible to a query at q iff q - p < window
    SOFT_CAP: tl.constexpr,  # 0.0: none; else scores x become SOFT_CAP * tanh(x / SOFT_CAP) (Gemma 2)
    BLOCK_M: tl.constexpr,  # rows per program, a power of two >= G
    BLOCK_Q: tl.constexpr,  # query tokens per program = BLOCK_M // G
    BLOCK_N: tl.constexpr,  # KV tokens per inner step
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of two >= HEAD_SIZE; the padding lanes are masked
    KV_BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact); None: Triton's default
    WRITE_KV: tl.constexpr,  # a decode-only step (one new row per request): store the new K/V here, not in write_kv_kernel
    ROTARY: tl.constexpr,  # with WRITE_KV: q and the new K arrive un-rotated; rotate them here (RotaryInputs)
    QK_NORM: tl.constexpr,  # with ROTARY: RMS-normalise each q and k head first (Qwen3)
    UNMASKED_FULL_TILES: tl.constexpr,  # tiles every row sees whole skip the masks (same bits; see below)
    V_CHUNK: tl.constexpr,  # 0: V stored like K; else each block's V is [kv_heads, head_size, block_size] (_attend_tile)
):
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    req = _find_request(query_start_loc_ptr, num_reqs, pid_q, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_block = pid_q - (q_start // BLOCK_Q + req)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len  # tokens already in the cache before this step's rows

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    tok = q_block * BLOCK_Q + offs_m // G  # query token index within the request
    head = kv_head * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (tok < q_len)
    d_ok = offs_d < HEAD_SIZE
    q_rows = (q_start + tok).to(tl.int64)
    q_src = q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_src, mask=q_mask, other=0.0)
    if ROTARY:
        # Every split program of a (request, KV head) rotates the same G heads: a few hundred bytes each,
        # against a launch of its own for the separate rotary kernel.
        q = _rotate_rows(q_src, q, q_mask, offs_d, cos_ptr + q_rows[:, None] * stride_ct + offs_d[None, :],
                         sin_ptr + q_rows[:, None] * stride_st + offs_d[None, :], q_norm_ptr, q_norm_eps,
                         HEAD_SIZE, QK_NORM)  # fmt: skip
    q_pos = ctx_len + tok  # absolute positions of the rows
    if (k_cache_ptr.dtype.element_ty == tl.float8e4nv) & (q.dtype == tl.bfloat16):
        # An FP8 cache's tiles widen to fp16 in one instruction per pair of values (to bf16 it takes a second
        # conversion per value), and every e4m3 value is an fp16 value, so a bf16 model's dots run in fp16.
        # Queries beyond fp16's range are clamped to it (no model's queries come near 65504). float32 queries
        # (the CPU interpreter's exact tests) keep float32.
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

    # KV range this tile needs: up to its last query row (causal), and from the
    # first row's window start when a sliding window is set.
    kv_end = ctx_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    kv_lo = 0
    if SLIDING_WINDOW > 0:
        kv_lo = tl.maximum(ctx_len + q_block * BLOCK_Q - SLIDING_WINDOW + 1, 0)
    tile_lo = kv_lo // BLOCK_N
    tile_hi = tl.cdiv(kv_end, BLOCK_N)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, tile_hi)

    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    tl.static_assert(not (WRITE_KV and V_CHUNK > 0), "keys-contiguous V (FP8 caches) is written by write_kv_kernel")
    if WRITE_KV:
        # One new row per request: the (request, KV head) program whose tiles hold it stores its K and V (no
        # other program of the step reads that slot), then reads it back from the cache as any other key.
        # One launch a layer fewer than write_kv_kernel + attention.
        last_tile = (seq_len - 1) // BLOCK_N
        if (last_tile >= tile_lo) & (last_tile < tile_hi):
            slot = tl.load(slot_mapping_ptr + q_start)
            if slot >= 0:
                dst = (slot // KV_BLOCK_SIZE) * stride_kb + (slot % KV_BLOCK_SIZE) * stride_ks + kv_head * stride_kh
                row = q_start.to(tl.int64)
                cols = offs_d[None, :]  # one-row tiles, the shape _rotate_rows takes
                col_ok = d_ok[None, :]
                k_src = key_ptr + row * stride_kt + kv_head * stride_kvh + cols
                k_new = tl.load(k_src, mask=col_ok, other=0.0)
                if ROTARY:
                    k_new = _rotate_rows(k_src, k_new, col_ok, offs_d, cos_ptr + row * stride_ct + cols,
                                         sin_ptr + row * stride_st + cols, k_norm_ptr, k_norm_eps,
                                         HEAD_SIZE, QK_NORM)  # fmt: skip
                v_new = tl.load(value_ptr + row * stride_vt + kv_head * stride_vvh + cols, mask=col_ok)
                tl.store(k_cache_ptr + dst + cols, k_new.to(k_cache_ptr.dtype.element_ty), mask=col_ok)
                tl.store(v_cache_ptr + dst + cols, v_new.to(v_cache_ptr.dtype.element_ty), mask=col_ok)
            tl.debug_barrier()  # the stores are visible to every thread of the program before the tiles load

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    # Tiles every row sees whole (below the first row's position, inside kv_end, no window) skip the masks: the
    # same arithmetic as the masked step on them (the masks would keep every element), less of it: most of a long
    # prefill's tiles. Decode launches without splits keep one masked loop (H200, run a8: the second loop cost
    # large decode batches 11-27%; prefill gained 11-22%).
    full_hi = tile_lo
    if UNMASKED_FULL_TILES and SLIDING_WINDOW == 0:
        full_hi = tl.maximum(tl.minimum(tile_hi, (ctx_len + q_block * BLOCK_Q + 1) // BLOCK_N), tile_lo)
    for t in range(tile_lo, full_hi):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, t, q_pos, kv_end, bt_row, k_cache_ptr, v_cache_ptr, kv_head,
                                     stride_kb, stride_ks, stride_kh, offs_d, d_ok, scale_log2, SLIDING_WINDOW,
                                     SOFT_CAP, BLOCK_N, HEAD_SIZE, HEAD_PAD, KV_BLOCK_SIZE, DOT_PRECISION, False,
                                     V_CHUNK)  # fmt: skip
    for t in range(full_hi, tile_hi):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, t, q_pos, kv_end, bt_row, k_cache_ptr, v_cache_ptr, kv_head,
                                     stride_kb, stride_ks, stride_kh, offs_d, d_ok, scale_log2, SLIDING_WINDOW,
                                     SOFT_CAP, BLOCK_N, HEAD_SIZE, HEAD_PAD, KV_BLOCK_SIZE, DOT_PRECISION, True,
                                     V_CHUNK)  # fmt: skip

    out = acc * (v_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # Partials are contiguous: [num_tokens, num_heads, NUM_SPLITS(, HEAD_PAD)].
        part = (q_rows * num_heads + head) * NUM_SPLITS + split
        tl.store(out_ptr + part[:, None] * HEAD_PAD + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)


@triton.jit
def reduce_splits_kernel(
    part_out_ptr,  # fp32 [num_tokens, num_heads, NUM_SPLITS, HEAD_PAD]
    part_m_ptr,  # fp32 [num_tokens, num_heads, NUM_SPLITS]
    part_l_ptr,  # fp32 [num_tokens, num_heads, NUM_SPLITS]
    out_ptr,  # [num_tokens, num_heads, head_size]
    stride_ot,
    stride_oh,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    s_ok = offs_s < NUM_SPLITS
    base = (tok * num_heads + head) * NUM_SPLITS
    m = tl.load(part_m_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + base + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    # Empty splits have m = -inf and l = 0: weight 0.
    w = tl.where(l_s > 0.0, tl.math.exp2(m - m_max) * l_s, 0.0)
    o = tl.load(part_out_ptr + (base + offs_s)[:, None] * HEAD_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + tok * stride_ot + head * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_SIZE
    )


@triton.jit
def _e4m3_bits(x):
    """float32 ``x`` -> the uint8 bits of float8 e4m3fn(x): round to nearest even, saturating at +-448 (NaN: 448).

    Built from integer ops rather than a cast: Triton's interpreter (how CI runs these kernels)
    rounds float->fp8 casts wrongly (a mantissa carry does not reach the exponent, subnormals
    flush), and this costs a few integer ops per element of an already memory-bound kernel.
    """
    # NaN saturates too (explicitly: the interpreter's minimum would keep it), so no cache byte is ever a NaN.
    a = tl.where(x != x, 448.0, tl.minimum(tl.abs(x), 448.0))
    sign = (x < 0.0).to(tl.int32) << 7
    # Normal range (a >= 2^-6): round float32's 23 mantissa bits to 3 (nearest even) with an integer
    # add, so a carry out of the mantissa bumps the exponent; then re-bias the exponent (127 -> 7).
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal range: multiples of 2^-9 (8 * 2^-9 = 2^-6 encodes as the smallest normal, bits 8).
    t = a * 512.0
    whole = tl.floor(t)
    frac = t - whole
    q = whole.to(tl.int32)
    q = q + ((frac > 0.5) | ((frac == 0.5) & ((q & 1) == 1))).to(tl.int32)
    return (tl.where(a < 0.015625, q, normal) | sign).to(tl.uint8)


@triton.jit
def write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    k_cache_ptr,  # cache[0]: [num_blocks, block_size, num_kv_heads, head_size] (uint8 view when FP8)
    v_cache_ptr,  # cache[1]
    slot_mapping_ptr,  # [num_tokens] int64; negative: skip the token
    k_scale,  # FP8: the stored value is x / k_scale (unused otherwise)
    v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,  # the cache holds e4m3 bits (the pointers are uint8 views), V keys-contiguous per block
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok)
    if slot < 0:
        return
    blk = slot // KV_BLOCK_SIZE
    off = slot % KV_BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_SIZE)[None, :]
    k = tl.load(key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    if FP8:
        # V goes to its block's [kv_heads, head_size, block_size] layout (keys contiguous; see _attend_tile).
        v_dst = blk * stride_cb + offs_h[:, None] * (HEAD_SIZE * KV_BLOCK_SIZE) + offs_d[None, :] * KV_BLOCK_SIZE + off
        tl.store(k_cache_ptr + dst, _e4m3_bits(k.to(tl.float32) / k_scale), mask=mask)
        tl.store(v_cache_ptr + v_dst, _e4m3_bits(v.to(tl.float32) / v_scale), mask=mask)
    else:
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
