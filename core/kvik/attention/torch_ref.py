"""Paged attention in plain PyTorch: the reference every other backend is checked against.

Runs on any torch device, any head size, with sliding windows and GQA. Work is
vectorised: all decode rows of a step share one gather and one attention call;
each prefill chunk gets one gather and one attention call.

An FP8 cache (``kv_cache_dtype="fp8"``, :mod:`kvik.attention.fp8_kv`) is quantized on
write and dequantized after each gather; attention always reads K/V through the cache
then, new tokens included, so every backend attends over the same (quantized) values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvik.attention import fp8_kv
from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.attention.invariant_ref import invariant_attention

_PLAN_KEY = "torch_ref"
# cuDNN's SDPA builds a graph per new shape (milliseconds of host time each), and
# decode shapes change every step; the other kernels need no such set-up.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    if not q.is_cuda:  # the context manager costs ~20 us a call: only pay it where cuDNN exists
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _soft_capped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float
) -> torch.Tensor:
    """SDPA with ``cap * tanh(score / cap)`` applied to the scores before the mask (Gemma 2).

    q [..., H, q, D], k/v [..., kvh, L, D] with H a multiple of kvh; mask additive, broadcastable.
    """
    if k.shape[-3] != q.shape[-3]:  # GQA: each kv head serves H / kvh consecutive query heads
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap + mask
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


@dataclass(slots=True)
class _Prefill:
    """One request with more than one new token."""

    start: int  # first row in the flattened batch
    end: int
    context_len: int  # cached + new tokens
    slots: torch.Tensor | None  # [context_len] int64 cache slots; None when there is no cached prefix


@dataclass(slots=True)
class _Plan:
    """Per-step index tensors shared by every layer (built once in prepare)."""

    decode_rows: torch.Tensor | None  # [nd] int64 rows of one-token requests
    decode_slots: torch.Tensor | None  # [nd, max_len] int64 cache slots (padding points at valid memory)
    decode_pos: torch.Tensor | None  # [1, max_len] int64 key positions
    decode_seq_lens: torch.Tensor | None  # [nd, 1] int64
    prefills: list[_Prefill]
    # A single decode request whose blocks are consecutive (a single stream on a fresh pool): its max_len
    # slots are the cache rows from this one, read as a view instead of gathered (docs/benchmarks.md).
    decode_first_slot: int | None = None
    decode_only: bool = False  # every request adds one token: rows need no gather/scatter
    # Masks shared by every layer with the same window, built by the first one.
    masks: dict[tuple[int | None, ...], torch.Tensor] = field(default_factory=dict)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive float mask, built once per step (SDPA would convert a bool one per call)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """block_table [..., max_blocks], positions [L] -> cache slots [..., L] int64."""
    blocks = block_table[..., positions // block_size].long()
    return blocks * block_size + positions % block_size


class TorchRefAttentionBackend(AttentionBackend[torch.Tensor]):
    name = "torch_ref"
    supported_device_types = ("cpu", "cuda", "mps")
    supports_sliding_window = True
    supports_logits_soft_cap = True
    supported_kv_cache_dtypes = ("auto", "fp8_e4m3")
    # deterministic=True: attention through kvik.attention.invariant_ref (fixed-shape blocks, no SDPA).
    supports_batch_invariance = True
    supports_kv_cache_groups = True

    @classmethod
    def prepare(cls, metadata: AttentionMetadata[torch.Tensor]) -> None:
        device = metadata.block_tables.device
        bs = metadata.block_size
        starts = [0]
        for q in metadata.query_lens_cpu:
            starts.append(starts[-1] + q)
        decode_reqs = [i for i, q in enumerate(metadata.query_lens_cpu) if q == 1]
        plan = _Plan(None, None, None, None, [])
        if decode_reqs:
            # Rounded up to whole blocks: fewer distinct shapes for kernels that specialise on them.
            max_len = -(-max(metadata.seq_lens_cpu[i] for i in decode_reqs) // bs) * bs
            reqs = torch.tensor(decode_reqs, dtype=torch.int64).to(device, non_blocking=True)
            pos = torch.arange(max_len, device=device)
            plan.decode_rows = torch.tensor([starts[i] for i in decode_reqs], dtype=torch.int64).to(
                device, non_blocking=True
            )
            plan.decode_slots = _slots(metadata.block_tables[reqs], pos, bs)
            plan.decode_pos = pos[None, :]
            plan.decode_seq_lens = metadata.seq_lens[reqs].long()[:, None]
            if len(decode_reqs) == 1 and device.type == "cpu":  # reading the table here costs no device sync
                blocks = metadata.block_tables[decode_reqs[0], : max_len // bs]
                if bool((blocks[1:] - blocks[:-1] == 1).all()):
                    plan.decode_first_slot = int(blocks[0]) * bs
        for i, q in enumerate(metadata.query_lens_cpu):
            if q == 1:
                continue
            context = metadata.seq_lens_cpu[i]
            slots = None
            if context > q:
                slots = _slots(metadata.block_tables[i], torch.arange(context, device=device), bs)
            plan.prefills.append(_Prefill(starts[i], starts[i] + q, context, slots))
        plan.decode_only = not plan.prefills
        metadata.backend_data[_PLAN_KEY] = plan

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:
        metadata = metadata.for_group(self.kv_cache_group)
        plan: _Plan | None = metadata.backend_data.get(_PLAN_KEY)
        if plan is None:
            self.prepare(metadata)
            plan = metadata.backend_data[_PLAN_KEY]
        k_cache = kv_cache[0].view(-1, self.num_kv_heads, self.head_size)  # [num_slots, kvh, D]
        v_cache = kv_cache[1].view(-1, self.num_kv_heads, self.head_size)
        n = metadata.num_tokens
        fp8_kv.write_slots(k_cache, metadata.slot_mapping[:n], key[:n], self.k_scale)
        fp8_kv.write_slots(v_cache, metadata.slot_mapping[:n], value[:n], self.v_scale)

        if self.batch_invariant:
            if self.logits_soft_cap:
                raise ValueError("torch_ref's batch-invariant mode does not implement attention logit soft-capping")
            return invariant_attention(
                query, kv_cache, metadata, self.num_kv_heads, self.scale, self.sliding_window
            )
        if plan.decode_only and query.shape[0] == n:
            return self._decode(query, kv_cache, plan)
        out = torch.empty_like(query)
        if plan.decode_rows is not None:
            out.index_copy_(0, plan.decode_rows, self._decode(query.index_select(0, plan.decode_rows), kv_cache, plan))
        for p in plan.prefills:
            out[p.start : p.end] = self._prefill(query, key, value, k_cache, v_cache, p, plan, metadata)
        return out

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """query [nd, H, D]: the decode rows, in request order -> [nd, H, D]."""
        assert plan.decode_slots is not None
        nd, max_len = plan.decode_slots.shape
        kvh, d = self.num_kv_heads, self.head_size
        # GQA without repeating K/V: the `group` query heads sharing a kv head
        # become `group` query rows of that head. q: [nd, kvh, group, D].
        q = query.reshape(nd, kvh, self.num_heads // kvh, d)
        # K and V in one gather: [2, nd * max_len, kvh, D] -> [2, nd, kvh, max_len, D]. A single stream's
        # consecutive slots are a view: gathering them copied its whole context every layer of every step
        # (SmolLM2 at 2,048 tokens: 250 -> 140 us a layer, the same bits).
        cache = kv_cache.view(2, -1, kvh, d)
        first = plan.decode_first_slot
        if first is not None and not fp8_kv.is_fp8(kv_cache):  # FP8 widens (and scales) a copy below
            kv = cache[:, first : first + max_len]
        else:
            kv = fp8_kv.index_select(cache, 1, plan.decode_slots.reshape(-1))
        kv = kv.view(2, nd, max_len, kvh, d).transpose(2, 3).to(q.dtype)
        if fp8_kv.is_fp8(kv_cache) and (self.k_scale != 1.0 or self.v_scale != 1.0):
            kv[0].mul_(self.k_scale)
            kv[1].mul_(self.v_scale)
        mask = self._decode_mask(plan, q.dtype)
        if self.logits_soft_cap:
            o = _soft_capped(q, kv[0], kv[1], mask, self.scale, self.logits_soft_cap)
        else:
            o = _sdpa(q, kv[0], kv[1], attn_mask=mask, scale=self.scale)
        return o.reshape(nd, self.num_heads, d)

    def _decode_mask(self, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [nd, 1, 1, max_len] (0 or -inf): shared by every layer with this window."""
        key = (-1, self.sliding_window)
        mask = plan.masks.get(key)
        if mask is None:
            assert plan.decode_pos is not None and plan.decode_seq_lens is not None
            mask = plan.decode_pos < plan.decode_seq_lens
            if self.sliding_window is not None:
                mask = mask & (plan.decode_pos >= plan.decode_seq_lens - self.sliding_window)
            mask = _additive(mask[:, None, None, :], dtype)
            plan.masks[key] = mask
        return mask

    def _prefill(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        p: _Prefill,
        plan: _Plan,
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:
        q = query[p.start : p.end].transpose(0, 1)[None]  # [1, H, q, D]
        if fp8_kv.is_fp8(k_cache):  # the quantized values, as every later step will read them
            slots = metadata.slot_mapping[p.start : p.end] if p.slots is None else p.slots
            k = fp8_kv.dequantize(fp8_kv.index_select(k_cache, 0, slots), self.k_scale, q.dtype)
            v = fp8_kv.dequantize(fp8_kv.index_select(v_cache, 0, slots), self.v_scale, q.dtype)
        elif p.slots is None:  # no cached prefix: the new K/V are the whole context
            k, v = key[p.start : p.end], value[p.start : p.end]
        else:
            k, v = k_cache.index_select(0, p.slots), v_cache.index_select(0, p.slots)
        k = k.to(q.dtype).transpose(0, 1)[None]  # [1, kvh, L, D]
        v = v.to(q.dtype).transpose(0, 1)[None]
        q_len = p.end - p.start
        gqa = self.num_heads != self.num_kv_heads
        if self.logits_soft_cap:
            mask = self._prefill_mask(q_len, p.context_len, q.device, q.dtype, plan)
            o = _soft_capped(q, k, v, mask, self.scale, self.logits_soft_cap)
        elif p.slots is None and self.sliding_window is None:
            o = _sdpa(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            mask = self._prefill_mask(q_len, p.context_len, q.device, q.dtype, plan)
            o = _sdpa(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return o[0].transpose(0, 1)  # [q, H, D]

    def _prefill_mask(
        self, q_len: int, context_len: int, device: torch.device, dtype: torch.dtype, plan: _Plan
    ) -> torch.Tensor:
        key = (q_len, context_len, self.sliding_window)
        mask = plan.masks.get(key)
        if mask is None:
            # Query row a sits at position context_len - q_len + a and sees keys
            # j <= that position (and, with a window W, j > position - W).
            q_pos = torch.arange(context_len - q_len, context_len, device=device)[:, None]
            k_pos = torch.arange(context_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if self.sliding_window is not None:
                mask = mask & (k_pos > q_pos - self.sliding_window)
            mask = _additive(mask, dtype)
            plan.masks[key] = mask
        return mask
