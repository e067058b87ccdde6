"""The triton backend against the torch reference backend, on random paged batches.

Without a GPU the kernels run under Triton's interpreter (conftest sets
TRITON_INTERPRET=1) on CPU tensors, with small shapes and small tiles so that
every code path (several KV tiles, several query blocks per request, splits)
is exercised in seconds. The backend itself only declares "cuda"; the
test-only subclasses in ``kvik_triton_attention.testing`` add "cpu" for the
interpreter and nothing else.
With a GPU, the same checks run on CUDA tensors, plus real model shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install --no-deps triton)")

from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.layers.batch_invariant import InvariantRMSNorm
from kvik.layers.norm import GemmaRMSNorm, RMSNorm
from kvik.layers.rotary import RopeSettings, RotaryEmbedding
from kvik_triton_attention.backend import TritonAttentionBackend
from kvik_triton_attention.testing import InterpretedTritonAttentionBackend, SmallTileTritonAttentionBackend

from .paged_batch import fresh_metadata, make_step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


SmallTiles = SmallTileTritonAttentionBackend  # also accepts cpu tensors (Triton's interpreter)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _compare(
    backend_cls: type[TritonAttentionBackend],
    reqs: list[tuple[int, int]],
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_size: int = 32,
    block_size: int = 4,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    seed: int = 0,
    soft_cap: float | None = None,
) -> None:
    step = make_step(
        reqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        device=DEVICE,
        seed=seed,
    )
    scale = head_size**-0.5
    ref = TorchRefAttentionBackend(num_heads, head_size, num_kv_heads, scale, sliding_window, soft_cap)
    tri = backend_cls(num_heads, head_size, num_kv_heads, scale, sliding_window, soft_cap)
    ref_cache, tri_cache = step.kv_cache.clone(), step.kv_cache.clone()
    ref_meta, tri_meta = fresh_metadata(step.metadata), fresh_metadata(step.metadata)
    TorchRefAttentionBackend.prepare(ref_meta)
    TritonAttentionBackend.prepare(tri_meta)
    expected = ref.forward(step.query, step.key, step.value, ref_cache, ref_meta)
    got = tri.forward(step.query, step.key, step.value, tri_cache, tri_meta)
    assert torch.equal(tri_cache, ref_cache), "K/V written to different slots or values"
    assert torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    err = _rel_err(got, expected)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


MIXED = [(0, 9), (7, 1), (13, 6), (0, 1), (30, 1), (21, 17)]  # prefill, decode, chunk with prefix, ...


def test_mixed_batch_matches_reference() -> None:
    _compare(SmallTiles, MIXED)


def test_decode_only_batch_matches_reference() -> None:
    _compare(SmallTiles, [(5, 1), (40, 1), (0, 1), (17, 1)], seed=1)


@pytest.mark.parametrize(
    ("reqs", "splits", "window"),
    [
        ([(5, 1), (40, 1), (0, 1)], None, None),
        ([(2, 1), (45, 1), (70, 1)], 2, None),  # the new row's split is the last non-empty one
        ([(2, 1), (45, 1), (70, 1)], 4, None),  # (2, 1) leaves most splits empty
        ([(33, 1), (60, 1)], 4, 20),
        (MIXED, None, None),  # not decode-only: write_kv_kernel as always
    ],
)
def test_the_in_attention_kv_write_of_decode_only_steps(
    reqs: list[tuple[int, int]], splits: int | None, window: int | None
) -> None:
    """A decode-only step runs no write_kv_kernel (the attention program holding the new row
    stores it, then reads it back); any other step still does. _compare checks the cache bit for bit and the
    output against torch_ref."""
    launched: list[int] = []

    class Fused(SmallTiles):
        force_num_splits = splits

        def write_kv(self, key: torch.Tensor, *args: object) -> None:
            launched.append(key.shape[0])
            super().write_kv(key, *args)  # type: ignore[arg-type]

    _compare(Fused, reqs, sliding_window=window, seed=8)
    assert launched == ([] if all(q == 1 for _, q in reqs) else [sum(q for _, q in reqs)])


# Triton's interpreter rounds float32 -> bfloat16 by truncation (tests/platforms/cuda/test_fused.py), so the
# same-bits checks take float16 there; a GPU also runs bfloat16.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("norm", [False, True], ids=["rotary", "qk_norm+rotary"])
@pytest.mark.parametrize(
    ("reqs", "splits", "window", "head_size"),
    [
        ([(5, 1), (40, 1), (0, 1)], None, None, 32),
        ([(2, 1), (45, 1), (70, 1)], 4, None, 32),  # every split rotates its own query rows
        ([(33, 1), (60, 1)], 2, 20, 48),  # a head size that is not a power of two (padded lanes)
    ],
)
def test_rotary_inside_decode_steps_matches_rotating_first(
    reqs: list[tuple[int, int]], splits: int | None, window: int | None, head_size: int, norm: bool, dtype: torch.dtype
) -> None:
    """forward_rotary on un-rotated q and k (strided views of one qkv row, as a model hands them over) against
    the eager RotaryEmbedding (and per-head RMSNorms) followed by forward. Under the interpreter, without
    norms, every step is elementwise and must give the same bits, in the cache and the output. On a GPU
    Triton's compiler may contract a product and a sum into one FMA (tests/platforms/cuda/test_fused.py), and
    the in-kernel RMSNorm sums a head in another order than torch, so those compare the new cache rows to
    within two units in the last place and the output to rounding."""
    num_heads, num_kv_heads = 4, 2
    step = make_step(reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, block_size=4,
                     dtype=dtype, device=DEVICE, seed=5)  # fmt: skip
    n = step.query.shape[0]
    qkv = torch.cat([step.query.reshape(n, -1), step.key.reshape(n, -1), step.value.reshape(n, -1)], dim=1)
    q, k, v = qkv.split([num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size], dim=1)
    q, k, v = q.view(n, num_heads, -1), k.view(n, num_kv_heads, -1), v.view(n, num_kv_heads, -1)
    rope = RotaryEmbedding(head_size, RopeSettings(theta=500.0), max_position=256, device=DEVICE)
    cos_sin = rope.cos_sin(step.metadata.seq_lens.long() - 1, dtype)
    gen = torch.Generator().manual_seed(2)
    norms: list[RMSNorm | None] = [None, None]
    if norm:
        norms = [RMSNorm(head_size, 1e-6, dtype, DEVICE), RMSNorm(head_size, 1e-5, dtype, DEVICE)]
        for m in norms:
            m.weight.data.copy_(1 + 0.5 * torch.randn(head_size, generator=gen))  # type: ignore[union-attr]
    inputs = rope.kernel_inputs(q, k, cos_sin, *norms)
    assert inputs is not None
    rotated_q, rotated_k = rope(q, k, cos_sin, *norms)

    class Splits(SmallTiles):
        force_num_splits = splits

    attn = Splits(num_heads, head_size, num_kv_heads, head_size**-0.5, window)
    first_cache, fused_cache = step.kv_cache.clone(), step.kv_cache.clone()
    first_meta, fused_meta = fresh_metadata(step.metadata), fresh_metadata(step.metadata)
    assert attn.fuses_rotary(fused_cache, fused_meta)
    expected = attn.forward(rotated_q.contiguous(), rotated_k.contiguous(), v, first_cache, first_meta)
    got = attn.forward_rotary(q, k, v, inputs, fused_cache, fused_meta)
    if not norm and not CUDA:
        assert torch.equal(fused_cache, first_cache) and torch.equal(got, expected)
        return
    if not norm:
        # Elementwise: each new key within two ulps of the products it sums (|x| |cos| + |x'| |sin| <= |x| + |x'|),
        # which is what an FMA's one rounding fewer can move where the two products cancel.
        slots = step.metadata.slot_mapping
        block_size = step.kv_cache.shape[2]
        new_rows = [c[0, slots // block_size, slots % block_size].float() for c in (fused_cache, first_cache)]
        scale = k.float().abs() + k.float().roll(head_size // 2, dims=-1).abs()
        assert ((new_rows[0] - new_rows[1]).abs() <= 2 * torch.finfo(dtype).eps * scale).all()
        for c in (fused_cache, first_cache):  # every other slot as it was
            c[:, slots // block_size, slots % block_size] = 0
        assert torch.equal(fused_cache, first_cache)
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(fused_cache, first_cache, rtol=tol, atol=tol)
    assert _rel_err(got, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_conformance_suite_with_its_rotary_decode_step() -> None:
    """kvik.testing's attention conformance check, whose third step hands this backend un-rotated q and k."""
    from kvik.testing.conformance.attention import check_attention_backend

    assert check_attention_backend(SmallTiles, device=DEVICE, head_sizes=(32,), heads=((4, 2),)) == 2


def test_rotary_stays_outside_attention_where_the_kernel_cannot_take_it() -> None:
    """Steps with more than one new row per request, an FP8 cache and deterministic mode rotate first; so do
    partial rotary and a Gemma-style norm (what RotaryInputs cannot describe)."""
    decode = make_step([(5, 1), (9, 1)], num_heads=4, num_kv_heads=2, head_size=32, block_size=4,
                       dtype=torch.bfloat16, device=DEVICE)  # fmt: skip
    mixed = make_step(MIXED, num_heads=4, num_kv_heads=2, head_size=32, block_size=4, dtype=torch.bfloat16,
                      device=DEVICE)  # fmt: skip
    attn = SmallTiles(4, 32, 2, 32**-0.5)
    assert attn.fuses_rotary(decode.kv_cache, decode.metadata)
    assert not attn.fuses_rotary(mixed.kv_cache, mixed.metadata)
    assert not attn.fuses_rotary(decode.kv_cache.to(torch.float8_e4m3fn), decode.metadata)
    assert not SmallTiles(4, 32, 2, 32**-0.5, batch_invariant=True).fuses_rotary(decode.kv_cache, decode.metadata)
    q, k = decode.query, decode.key
    full = RotaryEmbedding(32, RopeSettings(), max_position=64, device=DEVICE)
    cos_sin = full.cos_sin(torch.arange(q.shape[0], device=DEVICE), torch.bfloat16)
    assert full.kernel_inputs(q, k, cos_sin) is not None
    assert full.kernel_inputs(q, k, full.cos_sin(torch.arange(q.shape[0], device=DEVICE), torch.float32)) is None
    gemma = GemmaRMSNorm(32, 1e-6, torch.bfloat16, DEVICE)
    assert full.kernel_inputs(q, k, cos_sin, gemma, gemma) is None
    blocked = InvariantRMSNorm(32, 1e-6, torch.bfloat16, DEVICE)  # deterministic mode's own reduction order
    assert full.kernel_inputs(q, k, cos_sin, blocked, blocked) is None
    partial = RotaryEmbedding(32, RopeSettings(partial_rotary_factor=0.5), max_position=64, device=DEVICE)
    assert partial.kernel_inputs(q, k, partial.cos_sin(torch.arange(q.shape[0], device=DEVICE), torch.bfloat16)) is None


@pytest.mark.parametrize("num_heads,num_kv_heads", [(3, 3), (6, 2), (8, 1)])
def test_gqa_groups(num_heads: int, num_kv_heads: int) -> None:
    _compare(SmallTiles, [(0, 7), (9, 1), (11, 5)], num_heads=num_heads, num_kv_heads=num_kv_heads, seed=2)


@pytest.mark.parametrize("head_size", [16, 80])
def test_head_sizes_padded_to_pow2(head_size: int) -> None:
    _compare(SmallTiles, [(0, 6), (10, 1), (3, 4)], head_size=head_size, seed=3)


def test_unmasked_full_tiles_give_the_masked_bits() -> None:
    """Prefill tiles every row sees whole skip the masks; with the mask on for every tile the step must give the
    same bits (batch-invariant mode relies on it: which tiles a row sees whole depends on its batch), and both
    the reference's values. Long requests so that most tiles are whole. (With logit soft-capping whole tiles
    keep the mask: on the H200 the two kinds of tile gave different bits there.)"""

    class AllMasked(SmallTiles):
        unmask_full_tiles = False

    reqs = [(0, 70), (37, 45), (90, 1), (5, 3)]
    _compare(SmallTiles, reqs, seed=8)
    outs = []
    for cls in (SmallTiles, AllMasked):
        step = make_step(reqs, num_heads=4, num_kv_heads=2, head_size=32, block_size=4, dtype=torch.float32,
                         device=DEVICE, seed=8)  # fmt: skip
        backend = cls(4, 32, 2, 32**-0.5)
        meta = fresh_metadata(step.metadata)
        TritonAttentionBackend.prepare(meta)
        outs.append(backend.forward(step.query, step.key, step.value, step.kv_cache.clone(), meta))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window(window: int) -> None:
    _compare(SmallTiles, MIXED, sliding_window=window, seed=4)


@pytest.mark.parametrize("window", [None, 5])
def test_soft_cap(window: int | None) -> None:
    """Gemma 2's attention soft-cap (a cap of 0.5 bends every score of these random inputs)."""
    _compare(SmallTiles, MIXED, sliding_window=window, soft_cap=0.5, seed=6)


def test_soft_cap_with_split_kv_decode() -> None:
    class Split(SmallTiles):
        force_num_splits = 2

    _compare(Split, [(5, 1), (40, 1), (17, 1)], soft_cap=1.0, seed=7)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_kv_decode_matches_reference(splits: int) -> None:
    class Split(SmallTiles):
        force_num_splits = splits

    # (2, 1) leaves most splits empty: they must not pollute the reduction.
    _compare(Split, [(2, 1), (45, 1), (70, 1)], seed=5)
    _compare(Split, [(33, 1), (60, 1)], sliding_window=20, seed=6)


@pytest.mark.parametrize("splits", [1, 4])
def test_verify_shaped_steps_on_the_small_query_plan_match_reference(splits: int) -> None:
    """Speculative verify steps (a few tokens per request) take the decode tile and split-KV; a
    query longer than the plan's bound (a verify graph's padding) gets more query blocks."""

    class Split(SmallTiles):
        force_num_splits = splits

    _compare(Split, [(40, 5), (3, 5), (61, 2), (0, 1)], seed=11)
    _compare(Split, [(33, 4), (50, 3)], sliding_window=20, seed=12)
    step = make_step([(20, 5), (0, 9)], num_heads=4, num_kv_heads=2, head_size=32, block_size=4, dtype=torch.float32,
                     device=DEVICE)  # fmt: skip
    step.metadata.max_query_len_bound = 5  # the second request's 9 rows exceed it
    scale = 32**-0.5
    ref_meta, tri_meta = fresh_metadata(step.metadata), fresh_metadata(step.metadata)
    assert Split.small_query(tri_meta)
    expected = TorchRefAttentionBackend(4, 32, 2, scale).forward(
        step.query, step.key, step.value, step.kv_cache.clone(), ref_meta
    )
    got = Split(4, 32, 2, scale).forward(step.query, step.key, step.value, step.kv_cache.clone(), tri_meta)
    assert _rel_err(got, expected) < 1e-5


def test_default_tiles_and_block_size_16() -> None:
    _compare(InterpretedTritonAttentionBackend, [(0, 20), (70, 1), (50, 3)], block_size=16, seed=7)


def test_half_precision() -> None:
    _compare(SmallTiles, [(0, 5), (12, 1), (6, 3)], dtype=torch.float16, seed=8)


def test_split_heuristic_only_for_small_decode_batches() -> None:
    b = TritonAttentionBackend(8, 128, 1, 128**-0.5)  # one KV head: one program per request
    step = make_step([(4000, 1)], num_heads=1, num_kv_heads=1, head_size=16, block_size=16, dtype=torch.float32)
    device = torch.device("cuda") if CUDA else torch.device("cpu")  # the interpreter counts 4 "SMs"
    splits = b.num_splits(step.metadata, device, 64)
    assert splits > 1 and splits & (splits - 1) == 0
    step.metadata.max_query_len = 5  # a speculative verify step: still split
    assert b.num_splits(step.metadata, device, 64) > 1
    step.metadata.max_query_len = 17  # a prefill chunk: never
    assert b.num_splits(step.metadata, device, 64) == 1
    step.metadata.max_query_len_bound = 5  # a verify graph's plan: its padding may exceed the bound
    assert b.num_splits(step.metadata, device, 64) > 1
    big = make_step([(10, 1)] * 300, num_heads=1, num_kv_heads=1, head_size=16, block_size=16, dtype=torch.float32)
    assert b.num_splits(big.metadata, device, 64) == 1  # 300 programs fill any GPU


def test_validate_reasons() -> None:
    ok = TritonAttentionBackend.validate(
        head_size=128, dtype="bfloat16", device_type="cuda", block_size=16, sliding_window=4096
    )
    assert ok == []
    reasons = TritonAttentionBackend.validate(
        head_size=512, dtype="bfloat16", device_type="cpu", block_size=16, sliding_window=None
    )
    assert any("head size 512" in r for r in reasons)
    assert any("'cpu'" in r for r in reasons)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="real model shapes need a GPU (the interpreter is too slow for them)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_size",
    [(32, 8, 128), (9, 3, 64), (32, 8, 64), (16, 4, 80), (16, 2, 96), (8, 4, 256)],
)
def test_gpu_model_shapes(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int) -> None:
    reqs = [(0, 700), (1000, 1), (513, 1), (300, 250), (0, 1), (2047, 1), (64, 129)]
    for backend in (TritonAttentionBackend, SmallTiles):
        _compare(
            backend,
            reqs,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            block_size=16,
            dtype=dtype,
        )
    _compare(
        TritonAttentionBackend,
        reqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        block_size=16,
        dtype=dtype,
        sliding_window=256,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_gpu_split_kv_long_context() -> None:
    # Batch 2, 8k context: the heuristic picks several splits on any real GPU.
    _compare(
        TritonAttentionBackend,
        [(8000, 1), (3000, 1)],
        num_heads=32,
        num_kv_heads=8,
        head_size=128,
        block_size=16,
        dtype=torch.bfloat16,
    )


def test_split_count_is_planned_for_max_seq_len_bound() -> None:
    """A runner replaying graphs sets AttentionMetadata.max_seq_len_bound: the split count follows it."""
    assert TritonAttentionBackend.supports_cuda_graphs
    b = TritonAttentionBackend(8, 128, 1, 128**-0.5)
    step = make_step([(40, 1)], num_heads=1, num_kv_heads=1, head_size=16, block_size=16, dtype=torch.float32)
    device = torch.device("cuda") if CUDA else torch.device("cpu")
    assert b.num_splits(step.metadata, device, 64) == 1  # 41 tokens: too short to split
    step.metadata.max_seq_len_bound = 4096
    assert step.metadata.planned_max_seq_len == 4096
    assert b.num_splits(step.metadata, device, 64) > 1  # planned for the longest replay
