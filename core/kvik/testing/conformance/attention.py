"""Conformance check for attention backends: compare against TorchRefAttentionBackend.

Use in a backend plugin's tests::

    from kvik.testing.conformance.attention import check_attention_backend

    def test_conformance():
        check_attention_backend(MyBackend, device="cuda", dtype=torch.float16)

Each case runs two steps through the backend's own cache layout: step 1
prefills the cached prefixes, step 2 is a mixed batch (decodes, prefill
chunks over a cached prefix, fresh prefills, one-token prompts) with shuffled
block tables. Both steps' outputs are compared with the reference, so a wrong
cache write shows up as a wrong read in step 2. A backend that rotates q and k
itself (``fuses_rotary``) is also given a decode-only step 3 through
``forward_rotary``, with and without per-head norms, against the eager
``RotaryEmbedding`` and ``RMSNorm`` followed by the reference.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.layers.norm import RMSNorm
from kvik.layers.rope_settings import RopeSettings
from kvik.layers.rotary import RotaryEmbedding

# (atol, rtol) against a float32 reference computed from the same rounded inputs
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2.5e-2, 2.5e-2)}
# Unwritten cache memory holds this; a backend reading outside its context gets a visible error.
_SENTINEL = 50.0


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata[torch.Tensor]:
    """AttentionMetadata for a flattened batch (what a model runner builds each step)."""
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    width = max(len(t) for t in block_tables)
    tables = torch.zeros(len(block_tables), width, dtype=torch.int32)
    for i, t in enumerate(block_tables):
        tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    slots: list[int] = []
    for q, s, t in zip(query_lens, seq_lens, block_tables, strict=True):
        slots.extend(t[p // block_size] * block_size + p % block_size for p in range(s - q, s))
    return AttentionMetadata(
        num_tokens=starts[-1],
        num_reqs=len(query_lens),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )


@dataclass(slots=True)
class _Req:
    cached: int  # tokens written in step 1
    new: int  # tokens computed in step 2
    blocks: list[int]


def _requests(rng: random.Random, block_size: int, window: int | None) -> tuple[list[_Req], int]:
    """A mixed batch: decodes, chunks over a cached prefix, fresh prefills, a one-token prompt."""
    w = window or 8
    shapes = [
        (rng.randint(1, 3 * block_size), 1),  # short decode
        (rng.randint(3 * block_size, 6 * block_size) + w, 1),  # long decode, past the window
        (block_size - 1, 1),  # decode that starts a new block
        (rng.randint(1, 2 * block_size) + w, rng.randint(2, 2 * block_size)),  # chunk over a prefix
        (block_size, block_size),  # block-aligned chunk
        (0, rng.randint(2, 3 * block_size) + w),  # fresh prefill
        (0, 1),  # one-token prompt
    ]
    need = [-(-(c + n + 1) // block_size) for c, n in shapes]  # + 1: step 3's decode
    ids = list(range(1, sum(need) + 1))  # block 0 stays unused: padding points there
    rng.shuffle(ids)
    reqs, at = [], 0
    for (c, n), k in zip(shapes, need, strict=True):
        reqs.append(_Req(c, n, ids[at : at + k]))
        at += k
    return reqs, sum(need) + 1


def _run(
    backend: AttentionBackend,
    cache: torch.Tensor,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    query_lens: list[int],
    seq_lens: list[int],
    tables: list[list[int]],
    block_size: int,
) -> torch.Tensor:
    metadata = build_metadata(query_lens, seq_lens, tables, block_size, cache.device)
    type(backend).prepare(metadata)
    return backend.forward(*qkv, cache, metadata)


def check_attention_backend(
    backend_cls: type[AttentionBackend[torch.Tensor]],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    head_sizes: tuple[int, ...] = (64, 128, 80),
    heads: tuple[tuple[int, int], ...] = ((4, 4), (8, 2), (4, 1)),
    block_sizes: tuple[int, ...] = (16,),
    sliding_windows: tuple[int | None, ...] = (None, 7),
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> int:
    """Compare ``backend_cls`` with the torch reference on random paged batches.

    Configurations the backend's ``validate()`` rejects are skipped (at least
    one must run). Returns the number of configurations checked; raises
    ``AssertionError`` listing every mismatch with its configuration.
    """
    device = torch.device(device)
    default_atol, default_rtol = TOLERANCES.get(dtype, (2.5e-2, 2.5e-2))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    checked = 0
    for head_size in head_sizes:
        for num_heads, num_kv_heads in heads:
            for block_size in block_sizes:
                for window in sliding_windows:
                    reasons = backend_cls.validate(
                        head_size=head_size,
                        dtype=str(dtype).removeprefix("torch."),  # backends list dtype names
                        device_type=device.type,
                        block_size=block_size,
                        sliding_window=window,
                    )
                    if reasons:
                        continue
                    where = (
                        f"head_size={head_size} heads={num_heads}/{num_kv_heads} block_size={block_size} "
                        f"window={window} dtype={dtype}"
                    )
                    checked += 1
                    failures.extend(
                        f"{where}: {msg}"
                        for msg in _check_one(
                            backend_cls,
                            device,
                            dtype,
                            head_size,
                            num_heads,
                            num_kv_heads,
                            block_size,
                            window,
                            rng,
                            gen,
                            atol,
                            rtol,
                        )
                    )
    if checked == 0:
        raise AssertionError(f"{backend_cls.__name__}.validate() rejected every configuration tried on {device}")
    if failures:
        raise AssertionError(
            f"{backend_cls.__name__} disagrees with torch_ref in {len(failures)} check(s):\n  " + "\n  ".join(failures)
        )
    return checked


def _check_one(
    backend_cls: type[AttentionBackend[torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    head_size: int,
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    window: int | None,
    rng: random.Random,
    gen: torch.Generator,
    atol: float,
    rtol: float,
) -> list[str]:
    reqs, num_blocks = _requests(rng, block_size, window)
    scale = head_size**-0.5
    backend = backend_cls(num_heads, head_size, num_kv_heads, scale, window)
    ref = TorchRefAttentionBackend(num_heads, head_size, num_kv_heads, scale, window)
    cache = torch.full(
        backend_cls.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size),
        _SENTINEL,
        dtype=dtype,
        device=device,
    )
    ref_cache = torch.full(
        TorchRefAttentionBackend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size),
        _SENTINEL,
        dtype=torch.float32,
        device=device,
    )

    def rand(n: int, h: int) -> torch.Tensor:
        return torch.randn(n, h, head_size, generator=gen).to(device=device, dtype=dtype)

    problems: list[str] = []
    steps = [
        [(r.cached, r.cached, r.blocks) for r in reqs if r.cached > 0],
        [(r.new, r.cached + r.new, r.blocks) for r in reqs],
    ]
    for step, rows in enumerate(steps, start=1):
        q_lens = [q for q, _, _ in rows]
        s_lens = [s for _, s, _ in rows]
        tables = [b[: -(-s // block_size)] for _, s, b in rows]
        n = sum(q_lens)
        qkv = (rand(n, num_heads), rand(n, num_kv_heads), rand(n, num_kv_heads))
        try:
            out = _run(backend, cache, qkv, q_lens, s_lens, tables, block_size)
        except Exception as exc:  # report, don't hide: the message says which config broke
            problems.append(f"step {step} raised {type(exc).__name__}: {exc}")
            break
        expected = _run(ref, ref_cache, tuple(t.float() for t in qkv), q_lens, s_lens, tables, block_size)  # type: ignore[arg-type]
        if tuple(out.shape) != tuple(expected.shape):
            problems.append(f"step {step}: output shape {tuple(out.shape)}, expected {tuple(expected.shape)}")
            break
        if out.dtype != dtype:
            problems.append(f"step {step}: output dtype {out.dtype}, expected {dtype}")
        close = torch.isclose(out.float(), expected, atol=atol, rtol=rtol).all(dim=-1).all(dim=-1)  # [n]
        if not bool(close.all()):
            bad_rows = torch.nonzero(~close).flatten().tolist()
            starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
            bad_reqs = sorted({max(i for i, s in enumerate(starts) if s <= row) for row in bad_rows})
            detail = ", ".join(f"req {i} (query {q_lens[i]}, context {s_lens[i]})" for i in bad_reqs)
            err = (out.float() - expected).abs().max().item()
            problems.append(
                f"step {step}: {len(bad_rows)} of {n} rows differ (max abs err {err:.3g}, atol {atol}, rtol {rtol}) "
                f"in {detail}"
            )
    if not problems:
        problems.extend(_check_rotary_decode(backend, ref, cache, ref_cache, reqs, block_size, rand, atol, rtol))
    if not problems and backend_cls.splits_kv_write:
        problems.extend(_check_split_kv_write(backend, cache, steps[-1], block_size, rand))
    return problems


def _check_split_kv_write(
    backend: AttentionBackend[torch.Tensor],
    cache: torch.Tensor,
    rows: list[tuple[int, int, list[int]]],
    block_size: int,
    rand: Any,
) -> list[str]:
    """``splits_kv_write``: ``write_kv`` then ``attend`` gives ``forward``'s output and cache, bit for bit."""
    q_lens, s_lens = [q for q, _, _ in rows], [s for _, s, _ in rows]
    tables = [b[: -(-s // block_size)] for _, s, b in rows]
    n = sum(q_lens)
    num_heads, num_kv_heads = backend.num_heads, backend.num_kv_heads
    q, k, v = rand(n, num_heads), rand(n, num_kv_heads), rand(n, num_kv_heads)
    metadata = build_metadata(q_lens, s_lens, tables, block_size, cache.device)
    type(backend).prepare(metadata)
    whole, split = cache.clone(), cache.clone()
    expected = backend.forward(q, k, v, whole, metadata)
    backend.write_kv(k, v, split, metadata.slot_mapping)
    out = torch.empty_like(expected)
    backend.attend(q, split, metadata, out)
    problems = []
    if not torch.equal(out, expected):
        problems.append("splits_kv_write: write_kv + attend differ from forward")
    if not torch.equal(split, whole):
        problems.append("splits_kv_write: write_kv left another cache than forward")
    return problems


def _check_rotary_decode(
    backend: AttentionBackend[torch.Tensor],
    ref: TorchRefAttentionBackend,
    cache: torch.Tensor,
    ref_cache: torch.Tensor,
    reqs: list[_Req],
    block_size: int,
    rand: Callable[[int, int], torch.Tensor],
    atol: float,
    rtol: float,
) -> list[str]:
    """Step 3: one new token per request, handed over un-rotated when the backend says it rotates itself."""
    device, dtype, head_size = cache.device, cache.dtype, backend.head_size
    s_lens = [r.cached + r.new + 1 for r in reqs]
    q_lens = [1] * len(reqs)
    tables = [r.blocks[: -(-s // block_size)] for r, s in zip(reqs, s_lens, strict=True)]
    metadata = build_metadata(q_lens, s_lens, tables, block_size, device)
    if not backend.fuses_rotary(cache, metadata):
        return []
    rope = RotaryEmbedding(head_size, RopeSettings(theta=10000.0), max_position=4096, device=device)
    cos_sin = rope.cos_sin(torch.tensor([s - 1 for s in s_lens], device=device), dtype)
    problems = []
    for with_norms in (False, True):
        n = len(reqs)
        q, k, v = rand(n, backend.num_heads), rand(n, backend.num_kv_heads), rand(n, backend.num_kv_heads)
        norms: list[RMSNorm | None] = [None, None]
        if with_norms:
            norms = [RMSNorm(head_size, 1e-6, dtype, device), RMSNorm(head_size, 1e-5, dtype, device)]
            for norm in norms:
                assert norm is not None
                norm.weight.data = (1 + 0.25 * rand(1, 1).reshape(-1).float().tanh()).to(dtype)
        inputs = rope.kernel_inputs(q, k, cos_sin, *norms)
        assert inputs is not None
        step_metadata = build_metadata(q_lens, s_lens, tables, block_size, device)
        type(backend).prepare(step_metadata)
        try:
            out = backend.forward_rotary(q, k, v, inputs, cache, step_metadata)
        except Exception as exc:
            problems.append(f"step 3 (rotary inside, norms={with_norms}) raised {type(exc).__name__}: {exc}")
            break
        rotated_q, rotated_k = rope(q, k, cos_sin, *norms)
        expected = _run(ref, ref_cache, (rotated_q.float(), rotated_k.float(), v.float()), q_lens, s_lens, tables,
                        block_size)  # fmt: skip
        err = (out.float() - expected).abs().max().item()
        if not bool(torch.isclose(out.float(), expected, atol=atol, rtol=rtol).all()):
            problems.append(f"step 3 (rotary inside, norms={with_norms}): max abs err {err:.3g} (atol {atol}, rtol {rtol})")
    return problems
