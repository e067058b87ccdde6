"""Conformance check for attention backends' deterministic mode (``supports_batch_invariance``).

Use in a backend plugin's tests::

    from kvik.testing.conformance.batch_invariance import check_batch_invariance

    def test_batch_invariance():
        check_batch_invariance(MyBackend, device="cuda", dtype=torch.bfloat16)

A target request's full q/k/v are fixed. It runs whole and alone, then as chunks (its earlier
tokens already in the cache) inside batches of neighbours (prefills, decodes, other chunks) at
different places, including its last token as a decode row in a decode-only step and in a mixed
one. Built with ``batch_invariant=True``, the backend must return the target's rows with exactly
the bits of the whole run (docs/deterministic.md).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from kvik.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class Seq:
    """A request's full q/k/v over positions [0, len) and the chunk [start, end) a step computes."""

    q: torch.Tensor  # [len, num_heads, head_size]
    k: torch.Tensor  # [len, num_kv_heads, head_size]
    v: torch.Tensor
    start: int
    end: int


def make_seq(length: int, seed: int, start: int, end: int, heads: tuple[int, int, int], dtype: torch.dtype) -> Seq:
    """Random q/k/v of ``length`` tokens (``heads`` = (num_heads, num_kv_heads, head_size)), chunk [start, end)."""
    num_heads, num_kv_heads, head_size = heads
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(length, h, head_size, generator=g).to(dtype) for h in (num_heads, num_kv_heads, num_kv_heads))
    return Seq(q, k, v, start, end)


def run_step(
    backend: AttentionBackend[torch.Tensor],
    seqs: list[Seq],
    block_size: int,
    device: torch.device,
    seed: int,
    cache_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """One step over ``seqs`` on shuffled blocks, each one's tokens before its chunk cached first (by a
    step of the backend itself, so any cache layout works): each request's output rows, on the CPU.
    ``cache_dtype``: the KV cache's (default: the model's, ``seqs``' dtype)."""
    num_kv_heads, head_size = seqs[0].k.shape[1:]
    blocks = [-(-s.end // block_size) for s in seqs]
    num_blocks = 1 + sum(blocks)
    perm = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    tables = [[perm.pop() for _ in range(nb)] for nb in blocks]
    shape = type(backend).kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)
    cache = torch.zeros(shape, dtype=cache_dtype or seqs[0].q.dtype, device=device)
    cached = [(Seq(s.q, s.k, s.v, 0, s.start), t) for s, t in zip(seqs, tables, strict=True) if s.start > 0]
    if cached:
        _forward(backend, cache, [c for c, _ in cached], [t for _, t in cached], block_size, device)
    return _forward(backend, cache, seqs, tables, block_size, device)


def _forward(
    backend: AttentionBackend[torch.Tensor],
    cache: torch.Tensor,
    seqs: list[Seq],
    tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> list[torch.Tensor]:
    table_t = torch.zeros(len(seqs), max(map(len, tables)), dtype=torch.int32)
    slots: list[int] = []
    for i, (s, table) in enumerate(zip(seqs, tables, strict=True)):
        table_t[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s.start, s.end)]
    q_lens = [s.end - s.start for s in seqs]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        num_tokens=starts[-1],
        num_reqs=len(seqs),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s.end for s in seqs], dtype=torch.int32, device=device),
        block_tables=table_t.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
        max_query_len=max(q_lens),
        max_seq_len=max(s.end for s in seqs),
        query_lens_cpu=q_lens,
        seq_lens_cpu=[s.end for s in seqs],
    )
    type(backend).prepare(meta)
    qkv = [torch.cat([getattr(s, n)[s.start : s.end] for s in seqs]).to(device) for n in ("q", "k", "v")]
    out = backend.forward(qkv[0], qkv[1], qkv[2], cache, meta).cpu()
    return [out[a:b] for a, b in itertools.pairwise(starts)]


def check_batch_invariance(
    backend_cls: type[AttentionBackend[torch.Tensor]],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: tuple[int, int, int] = (4, 2, 32),
    block_size: int = 4,
    windows: tuple[int | None, ...] = (None, 9),
    length: int = 45,
    random_cases: int = 4,
    seed: int = 0,
    cache_dtype: torch.dtype | None = None,
) -> int:
    """Check that ``backend_cls(..., batch_invariant=True)`` gives a request's rows the same bits alone,
    in any batch and in any chunking (``cache_dtype``: e.g. ``torch.float8_e4m3fn`` for an FP8 KV cache).
    Returns the number of steps compared; raises ``AssertionError`` listing every mismatch (or when the
    backend does not declare ``supports_batch_invariance``)."""
    if not backend_cls.supports_batch_invariance:
        raise AssertionError(f"{backend_cls.__name__} does not declare supports_batch_invariance")
    device = torch.device(device)
    num_heads, num_kv_heads, head_size = heads
    rng = random.Random(seed)
    # (target chunk, neighbours as (len, start, end), the target's place); the last two put the final
    # token as a decode row in a mixed step and in a decode-only one.
    cases: list[tuple[tuple[int, int], list[tuple[int, int, int]], int]] = [
        ((0, 20), [(30, 0, 30), (12, 11, 12)], 1),
        ((20, 37), [(5, 4, 5)], 0),
        ((37, length), [(50, 17, 33), (9, 8, 9), (21, 0, 21)], 2),
        ((length - 1, length), [(40, 0, 40)], 1),
        ((length - 1, length), [(8, 7, 8), (30, 29, 30)], 0),
    ]
    for _ in range(random_cases):
        cut = rng.randrange(1, length)
        neighbours = []
        for _ in range(rng.randrange(0, 5)):
            n = rng.randrange(1, 60)
            neighbours.append((n, rng.randrange(0, n), n))
        cases.append(((cut, length), neighbours, rng.randrange(len(neighbours) + 1)))
    failures: list[str] = []
    compared = 0
    for window in windows:
        backend = backend_cls(num_heads, head_size, num_kv_heads, head_size**-0.5, window, batch_invariant=True)
        whole = run_step(backend, [make_seq(length, 7, 0, length, heads, dtype)], block_size, device, 0, cache_dtype)[0]
        for i, ((a, b), neighbours, place) in enumerate(cases):
            seqs = [make_seq(n, 100 + 10 * i + j, s, e, heads, dtype) for j, (n, s, e) in enumerate(neighbours)]
            seqs.insert(place, make_seq(length, 7, a, b, heads, dtype))
            got = run_step(backend, seqs, block_size, device, i + 1, cache_dtype)[place]
            compared += 1
            if not torch.equal(got, whole[a:b]):
                bad = int((got != whole[a:b]).any(dim=-1).any(dim=-1).sum())
                failures.append(
                    f"window={window}: rows [{a}, {b}) at place {place} of {len(seqs)} "
                    f"(neighbours {neighbours}): {bad} rows differ from the whole run"
                )
    if failures:
        raise AssertionError(
            f"{backend_cls.__name__} is not batch-invariant in {len(failures)} step(s):\n  " + "\n  ".join(failures)
        )
    return compared
