"""Deterministic mode's attention: a request's rows are bit-identical alone, in any batch, in any chunking.

Both batch-invariant backends are checked the same way: the torch reference's deterministic path
(kvik.attention.invariant_ref) on CPU tensors, and the Triton kernel (under Triton's interpreter
without a GPU) with small tiles (``invariant_tile``) so that short sequences span several KV tiles and query blocks.
A target request's full q/k/v are fixed; it runs whole and alone, then as a chunk (its earlier
tokens already cached) inside batches of random neighbours (prefills, decodes, other chunks), at
any position: its rows must come out with the same bits. Decode rows are compared between a
decode-only step and a mixed one, the case that went through different kernels before.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik_triton_attention.testing import SmallTileTritonAttentionBackend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 4, 2, 32, 4


@dataclass
class Seq:
    """A request's full q/k/v over positions [0, len) and the chunk [start, end) this step computes."""

    q: torch.Tensor  # [len, HEADS, HEAD_SIZE]
    k: torch.Tensor  # [len, KV_HEADS, HEAD_SIZE]
    v: torch.Tensor
    start: int
    end: int


def _seq(length: int, seed: int, start: int, end: int, dtype: torch.dtype) -> Seq:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(length, h, HEAD_SIZE, generator=g).to(dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
    return Seq(q, k, v, start, end)


def _run(backend: AttentionBackend, seqs: list[Seq], seed: int) -> list[torch.Tensor]:
    """One step over ``seqs`` (each request's earlier tokens already in the cache, on shuffled blocks)."""
    dtype = seqs[0].q.dtype
    blocks = [-(-s.end // BLOCK) for s in seqs]
    num_blocks = 1 + sum(blocks)
    perm = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    cache = torch.zeros(2, num_blocks, BLOCK, KV_HEADS, HEAD_SIZE, dtype=dtype)
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    slots: list[int] = []
    for i, (s, nb) in enumerate(zip(seqs, blocks, strict=True)):
        table = [perm.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(table, dtype=torch.int32)
        for p in range(s.end):
            slot = (table[p // BLOCK], p % BLOCK)
            if p < s.start:
                cache[0][slot], cache[1][slot] = s.k[p], s.v[p]
            else:
                slots.append(slot[0] * BLOCK + slot[1])
    q_lens = [s.end - s.start for s in seqs]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        num_tokens=starts[-1],
        num_reqs=len(seqs),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([s.end for s in seqs], dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_size=BLOCK,
        max_query_len=max(q_lens),
        max_seq_len=max(s.end for s in seqs),
        query_lens_cpu=q_lens,
        seq_lens_cpu=[s.end for s in seqs],
    )
    backend.prepare(meta)
    cat = [torch.cat([getattr(s, n)[s.start : s.end] for s in seqs]).to(DEVICE) for n in ("q", "k", "v")]
    out = backend.forward(cat[0], cat[1], cat[2], cache.to(DEVICE), meta).cpu()
    return [out[a:b] for a, b in itertools.pairwise(starts)]


def _backend(cls: type[AttentionBackend], window: int | None) -> AttentionBackend:
    return cls(HEADS, HEAD_SIZE, KV_HEADS, HEAD_SIZE**-0.5, window, batch_invariant=True)


BACKENDS = [TorchRefAttentionBackend, SmallTileTritonAttentionBackend]


@pytest.fixture(autouse=True)
def _small_torch_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Key tiles of 16 in the torch path too, so these short sequences span several."""
    import kvik.attention.invariant_ref as invariant_ref

    monkeypatch.setattr(invariant_ref, "BLOCK_N", 16)


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize("window", [None, 9])
def test_chunks_and_neighbours_do_not_change_a_row(cls: type[AttentionBackend], window: int | None) -> None:
    backend = _backend(cls, window)
    length = 45
    whole = _run(backend, [_seq(length, 7, 0, length, torch.float32)], seed=0)[0]
    # (chunk of the target, neighbours as (len, start, end), the target's place)
    cases = [
        ((0, 20), [(30, 0, 30), (12, 11, 12)], 1),
        ((20, 37), [(5, 4, 5)], 0),
        ((37, 45), [(50, 17, 33), (9, 8, 9), (21, 0, 21)], 2),
        ((44, 45), [(40, 0, 40)], 1),  # the last token as a decode row inside a mixed step
        ((44, 45), [(8, 7, 8), (30, 29, 30)], 0),  # ... and inside a decode-only step
    ]
    for i, ((a, b), neighbours, place) in enumerate(cases):
        seqs = [_seq(n, 100 + 10 * i + j, s, e, torch.float32) for j, (n, s, e) in enumerate(neighbours)]
        seqs.insert(place, _seq(length, 7, a, b, torch.float32))
        got = _run(backend, seqs, seed=i + 1)[place]
        assert torch.equal(got, whole[a:b]), f"case {i}: chunk [{a}, {b}) at place {place}"


@settings(max_examples=10, deadline=None)
@given(
    cut=st.integers(1, 39),
    neighbours=st.lists(st.tuples(st.integers(1, 48), st.integers(0, 47)), max_size=4),
    place=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_torch_ref_any_batch(cut: int, neighbours: list[tuple[int, int]], place: int, seed: int) -> None:
    """Hypothesis over chunk points, neighbour shapes and positions (the torch path: fast enough for many)."""
    backend = _backend(TorchRefAttentionBackend, None)
    length = 40
    whole = _run(backend, [_seq(length, 3, 0, length, torch.float32)], seed=0)[0]
    seqs = [_seq(n, seed + j, min(s, n - 1), n, torch.float32) for j, (n, s) in enumerate(neighbours)]
    place = place % (len(seqs) + 1)
    seqs.insert(place, _seq(length, 3, cut, length, torch.float32))
    assert torch.equal(_run(backend, seqs, seed=seed)[place], whole[cut:])


def test_invariant_results_match_the_default_attention() -> None:
    """The invariant paths compute attention (close to the SDPA reference, not just consistent)."""
    seqs = [_seq(45, 7, 20, 45, torch.float32), _seq(13, 8, 12, 13, torch.float32)]
    ref = _run(TorchRefAttentionBackend(HEADS, HEAD_SIZE, KV_HEADS, HEAD_SIZE**-0.5), seqs, seed=3)
    for cls in BACKENDS:
        got = _run(_backend(cls, None), seqs, seed=3)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_triton_invariant_plan_has_one_tile_and_no_splits() -> None:
    from kvik_triton_attention.backend import TritonAttentionBackend

    class Forced(TritonAttentionBackend):
        force_num_splits = 4

    backend = Forced(32, 128, 8, 0.1, batch_invariant=True)
    assert backend._tile(True) == backend._tile(False)
    decode = AttentionMetadata(1, 1, None, None, None, None, 16, 1, 4096, [1], [4096])  # type: ignore[arg-type]
    assert backend.num_splits(decode, torch.device("cpu"), 64) == 1
    default = Forced(32, 128, 8, 0.1)
    assert default.num_splits(decode, torch.device("cpu"), 64) == 4  # the default plan is untouched


def test_a_backend_without_the_capability_refuses() -> None:
    class Plain(AttentionBackend):
        name = "plain"

        def forward(self, *args):  # pragma: no cover - never built
            raise AssertionError

    with pytest.raises(ValueError, match="no batch-invariant mode"):
        Plain(4, 32, 2, 0.1, batch_invariant=True)
