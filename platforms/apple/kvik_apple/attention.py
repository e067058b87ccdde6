"""Paged attention in MLX over kvik's block tables ("mlx_paged").

The KV cache of one layer is one MLX array shaped like every kvik backend's,
``(2, num_blocks, block_size, num_kv_heads, head_size)``. New K/V rows are
scattered in at ``slot_mapping``; each request's context is gathered back
through its block table and attended with ``mx.fast.scaled_dot_product_attention``.

Types: this is an ``AttentionBackend[mx.array]``: query, key, value, the cache
and the array fields of its ``AttentionMetadata[mx.array]`` are MLX arrays, which
the MLX runner fills from the runner kit's layout (no torch anywhere).

Batch plan (built once per step in :meth:`prepare`): requests with one new
token (decode) attend as one padded batch ``[B, heads, 1, max_ctx]``; every
request with several new tokens (a prefill chunk) attends on its own, so a
long prompt never pads the decodes to its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import mlx.core as mx
from kvik.attention.backend import DTYPE_NAMES, AttentionBackend, AttentionMetadata

PLAN_KEY = "mlx_plan"


@dataclass(slots=True)
class _Chunk:
    """One request with several new tokens: rows ``q_start:q_start+q_len``."""

    q_start: int
    q_len: int
    start_pos: int  # cached tokens before this chunk
    ctx_blocks: mx.array | None  # [seq_len] block id of each context position; None: no cached prefix
    ctx_offsets: mx.array | None  # [seq_len] offset within the block


@dataclass(slots=True)
class _DecodeGroup:
    """All one-token requests, padded to the longest context among them."""

    rows: mx.array  # [B] int32: their rows in the flattened batch
    ctx_blocks: mx.array  # [B, max_ctx]
    ctx_offsets: mx.array  # [B, max_ctx]
    seq_lens: mx.array  # [B] int32
    uniform: bool  # all contexts equally long: no padding mask needed


@dataclass(slots=True)
class MLXAttentionPlan:
    write_blocks: mx.array  # [num_tokens] int32: block of each new token's slot
    write_offsets: mx.array  # [num_tokens] int32
    decode: _DecodeGroup | None
    chunks: list[_Chunk]
    # Outputs come out as [decode rows..., chunk rows...]; this index restores
    # flattened-batch order (None when that order already is the batch order).
    restore: mx.array | None
    masks: dict[Any, Any] = field(default_factory=dict)  # per sliding window, built on first use


def _context_slots(block_table: mx.array, ctx_len: int, block_size: int) -> tuple[mx.array, mx.array]:
    """(block ids, offsets) for positions ``0..ctx_len-1`` of rows of ``block_table`` [..., max_blocks]."""
    positions = mx.arange(ctx_len, dtype=mx.int32)
    blocks = mx.take(block_table, positions // block_size, axis=-1)
    offsets = positions % block_size
    return blocks, mx.broadcast_to(offsets, blocks.shape)


def build_plan(metadata: AttentionMetadata[mx.array]) -> MLXAttentionPlan:
    bs = metadata.block_size
    slots = metadata.slot_mapping
    plan = MLXAttentionPlan(write_blocks=slots // bs, write_offsets=slots % bs, decode=None, chunks=[], restore=None)
    decode_reqs: list[int] = []
    q_starts: list[int] = []
    q_start = 0
    for i, q_len in enumerate(metadata.query_lens_cpu):
        q_starts.append(q_start)
        if q_len == 1:
            decode_reqs.append(i)
        else:
            seq_len = metadata.seq_lens_cpu[i]
            start_pos = seq_len - q_len
            blocks = offsets = None
            if start_pos > 0:
                blocks, offsets = _context_slots(metadata.block_tables[i], seq_len, bs)
            plan.chunks.append(_Chunk(q_start, q_len, start_pos, blocks, offsets))
        q_start += q_len
    if decode_reqs:
        lens = [metadata.seq_lens_cpu[i] for i in decode_reqs]
        reqs = mx.array(decode_reqs, dtype=mx.int32)
        blocks, offsets = _context_slots(metadata.block_tables[reqs], max(lens), bs)
        plan.decode = _DecodeGroup(
            rows=mx.array([q_starts[i] for i in decode_reqs], dtype=mx.int32),
            ctx_blocks=blocks,
            ctx_offsets=offsets,
            seq_lens=mx.array(lens, dtype=mx.int32),
            uniform=len(set(lens)) == 1,
        )
    order = [q_starts[i] for i in decode_reqs] + [r for c in plan.chunks for r in range(c.q_start, c.q_start + c.q_len)]
    if order != list(range(metadata.num_tokens)):
        inverse = [0] * len(order)
        for out_row, batch_row in enumerate(order):
            inverse[batch_row] = out_row
        plan.restore = mx.array(inverse, dtype=mx.int32)
    return plan


def _decode_mask(group: _DecodeGroup, window: int | None) -> mx.array | None:
    """[B, 1, 1, max_ctx] bool: key k is visible to the query at position seq_len-1."""
    if group.uniform and window is None:
        return None
    keys = mx.arange(group.ctx_blocks.shape[1], dtype=mx.int32)[None, :]
    seq = group.seq_lens[:, None]
    visible = keys < seq
    if window is not None:
        visible = visible & (keys > seq - 1 - window)
    return visible[:, None, None, :]


def _chunk_mask(chunk: _Chunk, window: int | None) -> mx.array | str:
    """Causal with the last query aligned to the last key, optionally windowed."""
    if window is None:
        return "causal"  # MLX aligns "causal" lower-right: exactly the cached-prefix case
    q_pos = mx.arange(chunk.start_pos, chunk.start_pos + chunk.q_len, dtype=mx.int32)[:, None]
    keys = mx.arange(chunk.start_pos + chunk.q_len, dtype=mx.int32)[None, :]
    return ((keys <= q_pos) & (keys > q_pos - window))[None, None]


class MLXPagedAttentionBackend(AttentionBackend[mx.array]):
    name: ClassVar[str] = "mlx_paged"
    supported_dtypes: ClassVar[tuple[str, ...]] = DTYPE_NAMES
    supported_device_types: ClassVar[tuple[str, ...]] = ("mlx",)
    supports_sliding_window: ClassVar[bool] = True

    @classmethod
    def prepare(cls, metadata: AttentionMetadata[mx.array]) -> None:
        metadata.backend_data[PLAN_KEY] = build_plan(metadata)

    def forward(
        self,
        query: mx.array,  # [num_tokens, num_heads, head_size]
        key: mx.array,  # [num_tokens, num_kv_heads, head_size]
        value: mx.array,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: mx.array,  # (2, num_blocks, block_size, kv_heads, head_size)
        metadata: AttentionMetadata[mx.array],
    ) -> mx.array:  # [num_tokens, num_heads, head_size]
        plan: MLXAttentionPlan = metadata.backend_data[PLAN_KEY]
        # In-place scatter: kv_cache is the runner's array object, so the
        # update is visible to later steps (MLX donates the old buffer).
        kv_cache[0, plan.write_blocks, plan.write_offsets] = key
        kv_cache[1, plan.write_blocks, plan.write_offsets] = value
        masks = plan.masks.setdefault(self.sliding_window, {})
        outputs: list[mx.array] = []
        if plan.decode is not None:
            group = plan.decode
            if "decode" not in masks:
                masks["decode"] = _decode_mask(group, self.sliding_window)
            q = query[group.rows][:, :, None, :]  # [B, H, 1, D]
            k = kv_cache[0, group.ctx_blocks, group.ctx_offsets].transpose(0, 2, 1, 3)  # [B, KVH, ctx, D]
            v = kv_cache[1, group.ctx_blocks, group.ctx_offsets].transpose(0, 2, 1, 3)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=masks["decode"])
            outputs.append(out[:, :, 0, :])
        for n, chunk in enumerate(plan.chunks):
            if n not in masks:
                masks[n] = _chunk_mask(chunk, self.sliding_window)
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            q = query[rows].transpose(1, 0, 2)[None]  # [1, H, q_len, D]
            if chunk.ctx_blocks is None:  # no cached prefix: the new K/V are the whole context
                k, v = key[rows], value[rows]
            else:
                k = kv_cache[0, chunk.ctx_blocks, chunk.ctx_offsets]
                v = kv_cache[1, chunk.ctx_blocks, chunk.ctx_offsets]
            out = mx.fast.scaled_dot_product_attention(
                q, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], scale=self.scale, mask=masks[n]
            )
            outputs.append(out[0].transpose(1, 0, 2))
        result = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
        return result if plan.restore is None else result[plan.restore]
