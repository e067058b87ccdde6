"""Chi-square: with drafts, emitted tokens follow the target distribution, whatever the draft.

Rows are the verifier's: position 0 carries a draft, position 1 is the bonus row.
The first emitted token is the draft when accepted, else the residual sample; it
must be distributed as the target ``p`` (every knob applied) for any draft: a
likely one, an unlikely one, one the filters remove. A second position's token,
emitted only after an accepted first draft, must follow its own row's ``p``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from kvik.sample.sampler import Sampler, SamplingBatch
from kvik.sampling_params import SamplingParams

_spec = importlib.util.spec_from_file_location(
    "kvik_stat_helpers", Path(__file__).parents[1] / "sample" / "test_statistical.py"
)
stat = importlib.util.module_from_spec(_spec)  # the suite's chi-square helper and reference distribution
_spec.loader.exec_module(stat)  # type: ignore[union-attr]

N = 30_000


def _emitted(params: SamplingParams, draft: int, seeded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    logits = stat.LOGITS.float().expand(N, -1).clone()
    rows = [params.clone(seed=i) for i in range(N)] if seeded else [params] * N
    accepted, sampled = Sampler(seed=99).verify(logits, SamplingBatch(rows, [0] * N), [draft] * N)
    emitted = torch.where(accepted, torch.full_like(sampled, draft), sampled)
    return emitted, accepted


@pytest.mark.parametrize("draft", [0, 3, 9])
@pytest.mark.parametrize(
    "knobs",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8), dict(min_p=0.1)],
    ids=["t1", "topk", "topp", "minp"],
)
def test_first_token_follows_the_target(knobs, draft) -> None:
    expected = stat.expected(**knobs)
    emitted, accepted = _emitted(SamplingParams(**knobs), draft)
    counts = torch.bincount(emitted, minlength=len(expected)).double()
    assert counts[expected == 0].sum() == 0  # filtered tokens never appear, even as a draft
    kept = expected > 0
    assert stat.chi_square_pvalue(counts[kept], expected[kept] * N) > 1e-3
    # Acceptance itself happens with probability p(draft).
    assert float(accepted.double().mean()) == pytest.approx(
        float(expected[draft]), abs=4e-3 + 4 * (float(expected[draft]) / N) ** 0.5
    )


def test_seeded_rows_follow_the_target_and_repeat() -> None:
    params = SamplingParams(temperature=0.9)
    emitted, _ = _emitted(params, 2, seeded=True)
    expected = stat.expected(temperature=0.9)
    assert stat.chi_square_pvalue(torch.bincount(emitted, minlength=10).double(), expected * N) > 1e-3
    again, _ = _emitted(params, 2, seeded=True)
    assert torch.equal(emitted, again)


def test_two_positions_follow_the_target_jointly() -> None:
    """Row pairs: (draft 1 at a flat distribution, bonus at a peaked one). Token 2 exists only after acceptance."""
    flat = torch.zeros(10)
    peaked = stat.LOGITS.float()
    logits = torch.stack([flat, peaked]).repeat(N, 1)
    batch = SamplingBatch([SamplingParams(temperature=1.0)] * (2 * N), [0, 1] * N)
    accepted, sampled = Sampler(seed=5).verify(logits, batch, [1, -1] * N)
    first_ok = accepted[0::2]
    assert float(first_ok.double().mean()) == pytest.approx(0.1, abs=0.01)  # p(draft) = 1/10
    assert not accepted[1::2].any()  # a bonus row has no draft
    second = sampled[1::2][first_ok]
    expected = torch.softmax(stat.LOGITS, 0)
    assert stat.chi_square_pvalue(torch.bincount(second, minlength=10).double(), expected * second.numel()) > 1e-3


def test_greedy_rows_accept_exactly_the_argmax() -> None:
    logits = stat.LOGITS.float().expand(4, -1).clone()
    batch = SamplingBatch([SamplingParams(temperature=0)] * 4, [0] * 4)
    accepted, sampled = Sampler().verify(logits, batch, [0, 1, -1, 9])
    assert accepted.tolist() == [True, False, False, False]
    assert sampled.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "knobs", [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.2, top_p=0.8)], ids=str
)
@pytest.mark.parametrize("draft_kind", ["flat", "peaked_elsewhere", "equal"])
def test_sampled_drafts_with_their_q_follow_the_target(knobs, draft_kind) -> None:
    """Drafts drawn from a model's ``q`` and verified with it (min(1, p/q), residual max(0, p - q)):
    the emitted token follows ``p`` whatever ``q`` is; with q == p every draft is accepted."""
    expected = stat.expected(**knobs).float()
    q = {
        "flat": torch.full((10,), 0.1),
        "peaked_elsewhere": torch.softmax(-stat.LOGITS.float(), 0),  # the target's least likely tokens
        "equal": expected,
    }[draft_kind]
    gen = torch.Generator().manual_seed(7)
    drafts = torch.multinomial(q, N, replacement=True, generator=gen)
    logits = stat.LOGITS.float().expand(N, -1).clone()
    batch = SamplingBatch([SamplingParams(**knobs)] * N, [0] * N)
    accepted, sampled = Sampler(seed=3).verify(logits, batch, drafts.tolist(), q.expand(N, -1).clone())
    emitted = torch.where(accepted, drafts, sampled)
    counts = torch.bincount(emitted, minlength=10).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0
    assert stat.chi_square_pvalue(counts[kept], expected.double()[kept] * N) > 1e-3
    # P(accept) = sum_x min(p(x), q(x))
    assert float(accepted.double().mean()) == pytest.approx(float(torch.minimum(expected, q).sum()), abs=0.01)
