"""Chi-square tests: the sampler draws from the distribution each knob defines.

Each test samples N rows of the same logits in one batched call (fixed
generator seed, so the test is deterministic), then compares token counts with
the expected probabilities computed from the definition in float64. Tokens a
filter removes must never appear; the rest must pass a chi-square test at
p > 1e-3 (the statistic's p-value from torch's incomplete gamma function, so
scipy is not needed; checked against scipy where it is installed).
"""

from __future__ import annotations

import math

import pytest
import torch
from kvik.sample.sampler import Sampler, SamplingBatch
from kvik.sampling_params import SamplingParams

N = 40_000
LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0], dtype=torch.float64)


def expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, bias=None) -> torch.Tensor:
    """Probabilities by definition: bias, temperature, top-k, top-p (smallest prefix reaching top_p), min-p."""
    logits = LOGITS.clone()
    for token, b in (bias or {}).items():
        logits[token] += b
    probs = torch.softmax(logits / temperature, 0)
    order = torch.argsort(probs, descending=True).tolist()
    keep = order[:top_k] if top_k else order
    kept_probs = probs[keep] / probs[keep].sum()
    nucleus, mass = [], 0.0
    for token, p in zip(keep, kept_probs.tolist(), strict=True):
        if nucleus and mass >= top_p:
            break
        nucleus.append(token)
        mass += p
    best = probs[nucleus].max()
    final = [t for t in nucleus if probs[t] >= min_p * best]
    out = torch.zeros_like(probs)
    out[final] = probs[final] / probs[final].sum()
    return out


def draw(params: SamplingParams, seeded: bool = False) -> torch.Tensor:
    logits = LOGITS.float().expand(N, -1).clone()
    rows = [params.clone(seed=i) for i in range(N)] if seeded else [params] * N
    tokens = Sampler(seed=1234)(logits, SamplingBatch(params=rows, output_positions=[0] * N))
    return torch.bincount(tokens, minlength=len(LOGITS)).double()


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square test: P(X >= statistic) for X ~ chi2(len - 1) (scipy.stats.chisquare's p-value)."""
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(observed) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))  # the chi2 survival function


def test_chi_square_pvalue_closed_form() -> None:
    # With 3 categories (2 degrees of freedom) the chi2 survival function is exp(-x / 2).
    observed, expected = torch.tensor([30.0, 50.0, 20.0]), torch.tensor([40.0, 35.0, 25.0])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square_pvalue(observed, expected) == pytest.approx(math.exp(-statistic / 2), rel=1e-9)


def test_chi_square_pvalue_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    observed, expected = torch.tensor([18.0, 25.0, 31.0, 26.0]), torch.tensor([25.0, 25.0, 25.0, 25.0])
    assert chi_square_pvalue(observed, expected) == pytest.approx(stats.chisquare(observed, expected).pvalue)


def check(counts: torch.Tensor, probs: torch.Tensor) -> None:
    assert counts[probs == 0].sum() == 0, f"filtered tokens were sampled: {counts.tolist()}"
    kept = probs > 0
    pvalue = chi_square_pvalue(counts[kept], probs[kept] * counts.sum())
    assert pvalue > 1e-3, f"counts {counts.tolist()} vs probs {probs.tolist()}: p={pvalue:.2e}"


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=1.7),
        dict(top_k=3),
        dict(top_p=0.7),
        dict(top_p=0.95, temperature=0.8),
        dict(min_p=0.2),
        dict(top_k=6, top_p=0.8, min_p=0.3, temperature=1.3),
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_sampling_distribution(knobs) -> None:
    check(draw(SamplingParams(**knobs)), expected(**knobs))


def test_logit_bias_shifts_the_distribution() -> None:
    bias = {9: 4.0, 0: -1.0}
    check(draw(SamplingParams(logit_bias=bias, temperature=0.9)), expected(temperature=0.9, bias=bias))


def test_seeded_rows_follow_the_distribution_and_repeat() -> None:
    # One seed per row: the per-(seed, position) generators must still sample correctly ...
    params = SamplingParams(top_p=0.9, temperature=1.2)
    counts = draw(params, seeded=True)
    check(counts, expected(top_p=0.9, temperature=1.2))
    # ... and a seed gives the same token at the same position in any batch.
    logits = LOGITS.float().expand(64, -1).clone()
    rows = [params.clone(seed=i % 8) for i in range(64)]
    first = Sampler(seed=1)(logits.clone(), SamplingBatch(params=rows, output_positions=[3] * 64))
    second = Sampler(seed=2)(logits.clone(), SamplingBatch(params=rows[::-1], output_positions=[3] * 64))
    assert first.tolist() == second.flip(0).tolist()
