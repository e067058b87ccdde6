"""Random paged-attention steps for checking backends against each other.

Also used by ``benchmarks/triton_attention.py`` (the GPU kernel micro-benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvik.attention.backend import AttentionMetadata


@dataclass(slots=True)
class PagedStep:
    query: torch.Tensor  # [num_tokens, num_heads, head_size]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_size], cached prefixes filled
    metadata: AttentionMetadata


def make_step(
    reqs: list[tuple[int, int]],  # (cached context tokens, new tokens) per request
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    extra_blocks: int = 3,
    seed: int = 0,
) -> PagedStep:
    """A mixed batch whose requests own shuffled (non-contiguous) blocks; block 0 stays the null block."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-(ctx + new) // block_size) for ctx, new in reqs]
    num_blocks = 1 + sum(blocks_per_req) + extra_blocks
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(blocks_per_req)
    block_tables = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype)
    slots: list[int] = []
    starts = [0]
    for i, ((ctx, new), nb) in enumerate(zip(reqs, blocks_per_req, strict=True)):
        table = [perm.pop() for _ in range(nb)]
        block_tables[i, :nb] = torch.tensor(table, dtype=torch.int32)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + new)]
        starts.append(starts[-1] + new)
    num_tokens = starts[-1]
    query = torch.randn(num_tokens, num_heads, head_size, generator=gen).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    seq_lens = [ctx + new for ctx, new in reqs]
    query_lens = [new for _, new in reqs]
    metadata = AttentionMetadata(
        num_tokens=num_tokens,
        num_reqs=len(reqs),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return PagedStep(query.to(device), key.to(device), value.to(device), cache.to(device), metadata)


def fresh_metadata(m: AttentionMetadata) -> AttentionMetadata:
    """The same step with empty backend_data (each backend derives its own)."""
    return AttentionMetadata(
        num_tokens=m.num_tokens,
        num_reqs=m.num_reqs,
        query_start_loc=m.query_start_loc,
        seq_lens=m.seq_lens,
        block_tables=m.block_tables,
        slot_mapping=m.slot_mapping,
        block_size=m.block_size,
        max_query_len=m.max_query_len,
        max_seq_len=m.max_seq_len,
        query_lens_cpu=m.query_lens_cpu,
        seq_lens_cpu=m.seq_lens_cpu,
        max_seq_len_bound=m.max_seq_len_bound,
        max_query_len_bound=m.max_query_len_bound,
    )
