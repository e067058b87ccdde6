"""Deterministic mode's attention: a request's rows are bit-identical alone, in any batch, in any chunking.

Both batch-invariant backends go through the conformance check
(kvik.testing.conformance.batch_invariance): the torch reference's deterministic path
(kvik.attention.invariant_ref) on CPU tensors, and the Triton kernel (under Triton's interpreter
without a GPU) with small tiles (``invariant_tile``) so that short sequences span several KV tiles
and query blocks. Decode rows are compared between a decode-only step and a mixed one, the case
that went through different kernels before.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.testing.conformance.batch_invariance import check_batch_invariance, make_seq, run_step
from kvik_triton_attention.testing import SmallTileTritonAttentionBackend

pytestmark = pytest.mark.usefixtures("row_by_row_interpreted_dot")  # tests/conftest.py says why
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS = (4, 2, 32)  # query heads, kv heads, head size
BACKENDS = [TorchRefAttentionBackend, SmallTileTritonAttentionBackend]


@pytest.fixture(autouse=True)
def _small_torch_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Key tiles of 16 in the torch path too, so these short sequences span several."""
    import kvik.attention.invariant_ref as invariant_ref

    monkeypatch.setattr(invariant_ref, "BLOCK_N", 16)


@pytest.mark.parametrize(("cls", "random_cases"), [(TorchRefAttentionBackend, 8), (SmallTileTritonAttentionBackend, 1)])
def test_conformance(cls: type[AttentionBackend], random_cases: int) -> None:
    """The fixed cases plus random ones (fewer for the interpreted kernel), with and without a window."""
    compared = check_batch_invariance(cls, device=DEVICE, heads=HEADS, random_cases=random_cases)
    assert compared == 2 * (5 + random_cases)


@pytest.mark.parametrize("cls", BACKENDS)
def test_conformance_on_an_fp8_cache(cls: type[AttentionBackend]) -> None:
    """Deterministic mode over an FP8 KV cache: the Triton kernel reads its keys-contiguous V in runs of one
    block's keys (here runs of 4, the block size) with the same invariant tile as any other cache."""
    compared = check_batch_invariance(cls, device=DEVICE, heads=HEADS, random_cases=0, cache_dtype=torch.float8_e4m3fn)
    assert compared == 2 * 5


@settings(max_examples=10, deadline=None)
@given(
    cut=st.integers(1, 39),
    neighbours=st.lists(st.tuples(st.integers(1, 48), st.integers(0, 47)), max_size=4),
    place=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_torch_ref_any_batch(cut: int, neighbours: list[tuple[int, int]], place: int, seed: int) -> None:
    """Hypothesis over chunk points, neighbour shapes and positions (the torch path: fast enough for many)."""
    backend = TorchRefAttentionBackend(4, 32, 2, 32**-0.5, batch_invariant=True)
    whole = run_step(backend, [make_seq(40, 3, 0, 40, HEADS, torch.float32)], 4, DEVICE, seed=0)[0]
    seqs = [make_seq(n, seed + j, min(s, n - 1), n, HEADS, torch.float32) for j, (n, s) in enumerate(neighbours)]
    place = place % (len(seqs) + 1)
    seqs.insert(place, make_seq(40, 3, cut, 40, HEADS, torch.float32))
    assert torch.equal(run_step(backend, seqs, 4, DEVICE, seed=seed)[place], whole[cut:])


def test_invariant_results_match_the_default_attention() -> None:
    """The invariant paths compute attention (close to the SDPA reference, not just consistent)."""
    seqs = [make_seq(45, 7, 20, 45, HEADS, torch.float32), make_seq(13, 8, 12, 13, HEADS, torch.float32)]
    ref = run_step(TorchRefAttentionBackend(4, 32, 2, 32**-0.5), seqs, 4, DEVICE, seed=3)
    for cls in BACKENDS:
        got = run_step(cls(4, 32, 2, 32**-0.5, batch_invariant=True), seqs, 4, DEVICE, seed=3)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_the_default_plan_is_not_invariant_and_the_check_says_so() -> None:
    """The check has teeth: the default Triton plan (split-KV decode, another tile for decode-only
    steps) fails it under the same cases."""

    class DefaultPlan(SmallTileTritonAttentionBackend):
        decode_tile = (16, 16, 4)
        prefill_tile = (64, 16, 4)
        force_num_splits = 2
        invariant_tile = (64, 16, 4)

        def __init__(self, *args, batch_invariant: bool = False, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)  # built "invariant" but running the default plan

    with pytest.raises(AssertionError, match="not batch-invariant"):
        check_batch_invariance(DefaultPlan, device=DEVICE, heads=HEADS, windows=(None,), random_cases=0)


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
    with pytest.raises(AssertionError, match="does not declare"):
        check_batch_invariance(Plain)
