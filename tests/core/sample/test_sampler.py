"""The batched sampler: greedy, filters against brute force, sampling frequencies, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from kvik.sample.sampler import Sampler, SamplingBatch, apply_min_p, apply_top_k_top_p, argmax_rows, row_seed
from kvik.sampling_params import SamplingParams


def column(values, like, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)[:, None]


def batch(params: list[SamplingParams], positions: list[int] | None = None) -> SamplingBatch:
    return SamplingBatch(params=params, output_positions=positions or [0] * len(params))


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def brute_force_keep(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens a single row keeps, computed one token at a time from the definitions."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(logits[order].double(), 0).tolist()
    keep, mass = [], 0.0
    for token, p in zip(order, probs, strict=True):
        if keep and mass >= top_p:
            break
        keep.append(token)
        mass += p
    if min_p:
        full = torch.softmax(logits.double(), 0)
        best = max(full[keep]).item()
        keep = [t for t in keep if full[t].item() >= min_p * best]
    return set(keep)


def test_greedy_rows_take_the_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    params = [SamplingParams(temperature=0.0)] * 5
    assert Sampler().__call__(logits, batch(params)).tolist() == logits.argmax(-1).tolist()


_ROW_VALUES = st.sampled_from([0.0, 1.0, -1.0, 3.5, float("inf"), float("-inf"), float("nan")]) | st.floats(-4, 4)


@settings(max_examples=200, deadline=None)
@given(arrays("float32", st.tuples(st.integers(1, 6), st.integers(1, 40)), elements=_ROW_VALUES), st.booleans())
def test_argmax_rows_is_torch_argmax(values, transposed: bool) -> None:
    """Ties, infinities and NaN (which torch counts as the maximum) give torch's index, on contiguous
    rows and on a transposed view alike."""
    x = torch.from_numpy(values)
    if transposed:
        x = x.t()
    got = argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))


def test_greedy_rows_in_a_mixed_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, top_k=5) for i in range(6)]
    tokens = Sampler(seed=1)(logits, batch(params))
    assert tokens[0::2].tolist() == logits[0::2].argmax(-1).tolist()
    for row in (1, 3, 5):
        assert tokens[row].item() in set(logits[row].topk(5).indices.tolist())


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [
        (0, 1.0, 0.0),
        (1, 1.0, 0.0),
        (7, 1.0, 0.0),
        (0, 0.5, 0.0),
        (0, 0.9, 0.0),
        (10, 0.8, 0.0),
        (0, 1.0, 0.1),
        (20, 0.95, 0.05),
    ],
)
def test_filters_match_brute_force(top_k: int, top_p: float, min_p: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 64) * 2
    # Rows with other settings must not disturb these rows.
    params = [SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)] * 4 + [SamplingParams()] * 4
    b = batch(params)
    filtered = apply_min_p(apply_top_k_top_p(logits.clone(), b, column), b, column)
    for row in range(8):
        expected = brute_force_keep(logits[row], top_k, top_p, min_p) if row < 4 else set(range(64))
        assert kept(filtered[row : row + 1])[0] == expected, f"row {row}"
    # Kept logits are unchanged.
    mask = torch.isfinite(filtered)
    torch.testing.assert_close(filtered[mask], logits[mask])


def test_sampling_frequencies_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20000
    params = [SamplingParams(temperature=2.0, top_k=4)] * rows
    tokens = Sampler(seed=3)(logits.repeat(rows, 1), batch(params))
    freq = torch.bincount(tokens, minlength=6).double() / rows
    expected = torch.zeros(6, dtype=torch.float64)
    expected[:4] = torch.softmax(logits[:4].double() / 2.0, 0)
    assert freq[4:].sum() == 0
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_seeded_row_is_independent_of_batch_and_history() -> None:
    torch.manual_seed(4)
    logits = torch.randn(512)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = Sampler(seed=0)(logits[None], batch([seeded], [7])).item()
    # Another batch: other rows around it, a sampler that already ran many steps, another engine seed.
    busy = Sampler(seed=99)
    for _ in range(5):
        busy(torch.randn(3, 512), batch([SamplingParams()] * 3))
    others = torch.randn(4, 512)
    mixed = torch.cat([others[:2], logits[None], others[2:]])
    params = [SamplingParams(), SamplingParams(seed=5), seeded, SamplingParams(temperature=0.0), SamplingParams()]
    assert busy(mixed, batch(params, [0, 7, 7, 0, 3]))[2].item() == alone


def test_seeded_positions_draw_different_noise() -> None:
    logits = torch.zeros(512)  # uniform: the token is decided by the noise alone
    seeded = SamplingParams(temperature=1.0, seed=7)
    sampler = Sampler()
    tokens = [sampler(logits[None], batch([seeded], [pos])).item() for pos in range(20)]
    again = [Sampler(seed=5)(logits[None], batch([seeded], [pos])).item() for pos in range(20)]
    assert tokens == again  # recomputing a request (e.g. after preemption) repeats its tokens
    assert len(set(tokens)) > 10


def test_unseeded_rows_follow_the_engine_seed() -> None:
    logits = torch.zeros(4, 512)
    params = [SamplingParams()] * 4
    first = [Sampler(seed=11)(logits, batch(params)).tolist() for _ in range(2)]
    assert first[0] == first[1]
    assert Sampler(seed=12)(logits, batch(params)).tolist() != first[0]


def test_row_seed_mixes_seed_and_position() -> None:
    seeds = {row_seed(s, p) for s in range(30) for p in range(30)}
    assert len(seeds) == 900
    assert all(0 <= s < 2**63 for s in seeds)


def test_logits_processors_run_first() -> None:
    sampler = Sampler()

    def ban_top(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        return logits.scatter(1, logits.argmax(-1, keepdim=True), float("-inf"))

    sampler.logits_processors.append(ban_top)
    logits = torch.tensor([[0.0, 5.0, 3.0]])
    assert sampler(logits, batch([SamplingParams(temperature=0.0)])).tolist() == [2]


@pytest.mark.parametrize("scale", [6.0, 0.01])  # peaked: nucleus within the candidates; flat: falls back to a sort
def test_candidate_top_p_equals_the_full_sort(scale: float) -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 3000) * scale
    params = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.5, top_k=100),
        SamplingParams(top_k=200),
        SamplingParams(),
        SamplingParams(top_p=0.99),
        SamplingParams(top_p=0.3, top_k=3000),
    ]
    b = batch(params)
    fast = apply_top_k_top_p(logits.clone(), b, column, candidates=256)
    slow = apply_top_k_top_p(logits.clone(), b, column, candidates=0)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(slow))
    torch.testing.assert_close(fast[torch.isfinite(fast)], slow[torch.isfinite(slow)])
    for row in (0, 1, 4):
        expected = brute_force_keep(logits[row], params[row].top_k, params[row].top_p, 0.0)
        assert kept(fast[row : row + 1])[0] == expected
