"""The MLX sampler against kvik's torch sampler (filters) and against the SamplingParams contract."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")

import torch  # noqa: E402
from kvik.sample import sampler as torch_sampler  # noqa: E402
from kvik.sample.sampler import SamplingBatch  # noqa: E402
from kvik.sampling_params import SamplingParams  # noqa: E402
from kvik_apple.sampler import MLXSampler, apply_min_p, apply_top_k_top_p, top_logprobs  # noqa: E402

VOCAB = 64


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, VOCAB)) * 2).astype(np.float32)


def _batch(params: list[SamplingParams], positions: list[int] | None = None, **kw) -> SamplingBatch:
    return SamplingBatch(params=params, output_positions=positions or [0] * len(params), **kw)


def _torch_column(values, like, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)[:, None]


FILTERS = [
    SamplingParams(top_k=5),
    SamplingParams(top_p=0.7),
    SamplingParams(top_k=10, top_p=0.5),
    SamplingParams(min_p=0.2),
    SamplingParams(),
    SamplingParams(top_k=1),
]


def test_filters_keep_the_same_tokens_as_torch():
    logits = _logits(len(FILTERS))
    batch = _batch(FILTERS)
    ref = torch_sampler.apply_top_k_top_p(torch.from_numpy(logits), batch, _torch_column)
    ref = torch_sampler.apply_min_p(ref, batch, _torch_column)
    got = apply_min_p(apply_top_k_top_p(mx.array(logits), FILTERS), FILTERS)
    np.testing.assert_array_equal(np.isfinite(np.array(got)), torch.isfinite(ref).numpy())
    kept = np.isfinite(np.array(got))
    np.testing.assert_array_equal(np.array(got)[kept], logits[kept])


def test_greedy_and_processors_match_a_numpy_reference():
    logits = _logits(4, seed=1)
    prompt, output = [1, 2, 3], [3, 4, 4, 9]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}),
        SamplingParams(temperature=0.0, allowed_token_ids=[10, 11, 12], min_tokens=8, stop_token_ids=[11]),
    ]
    expected = logits.copy()
    row = expected[1]
    seen = sorted({*prompt, *output})
    row[seen] = np.where(row[seen] > 0, row[seen] / 1.5, row[seen] * 1.5)
    counts = np.bincount(output, minlength=VOCAB)
    row -= 0.5 * counts + 0.3 * (counts > 0)
    expected[2, 7] += 100.0
    allowed = np.full(VOCAB, -np.inf, dtype=np.float32)
    allowed[[10, 12]] = 0  # 11 is a stop token banned until min_tokens outputs exist
    expected[3] += allowed
    sampler = MLXSampler(eos_token_ids=frozenset({2}))
    batch = _batch(params, [len(output)] * 4, prompt_token_ids=[prompt] * 4, output_token_ids=[output] * 4)
    got = np.array(sampler(mx.array(logits), batch)).tolist()
    assert got == expected.argmax(-1).tolist()


def test_min_tokens_bans_eos():
    logits = _logits(1, seed=2)
    logits[0, 2] = 50.0  # EOS would win
    sampler = MLXSampler(eos_token_ids=frozenset({2}))
    params = SamplingParams(temperature=0.0, min_tokens=3)
    early = sampler(mx.array(logits), _batch([params], [1], output_token_ids=[[5]]))
    late = sampler(mx.array(logits), _batch([params], [3], output_token_ids=[[5, 6, 7]]))
    assert np.array(early).item() != 2 and np.array(late).item() == 2


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = _logits(5, seed=3)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = [np.array(MLXSampler(seed=s)(mx.array(logits[2:3]), _batch([seeded], [7]))).item() for s in (0, 1)]
    mixed = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0), seeded, SamplingParams(top_k=3)]
    in_batch = MLXSampler(seed=9)(mx.array(logits[[0, 1, 2, 3]]), _batch(mixed, [0, 4, 7, 2]))
    assert alone[0] == alone[1] == np.array(in_batch)[2].item()
    # Another output position draws fresh noise: over positions the seeded row is not constant.
    draws = {np.array(MLXSampler()(mx.array(logits[2:3]), _batch([seeded], [p]))).item() for p in range(20)}
    assert len(draws) > 1


def test_sampling_follows_the_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (VOCAB - 4)], dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_p=0.9)  # keeps the first three tokens
    n = 3000
    sampler = MLXSampler(seed=0)
    rows = mx.array(np.repeat(logits, n, axis=0))
    counts = np.bincount(np.array(sampler(rows, _batch([params] * n))), minlength=VOCAB)
    assert counts[3:].sum() == 0
    expected = np.array([0.5, 0.3, 0.15]) / 0.95
    np.testing.assert_allclose(counts[:3] / n, expected, atol=0.03)


def test_top_logprobs_shape():
    lp = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float32))
    assert list(top_logprobs(lp, 2, chosen=0)) == [1, 2, 0]
    assert list(top_logprobs(lp, 0, chosen=2)) == [2]
