"""The MLX sampler against kvik's torch sampler (filters) and against the SamplingParams contract."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")

import torch  # noqa: E402
from kvik.sample import sampler as torch_sampler  # noqa: E402
from kvik.sample.sampler import SamplingBatch  # noqa: E402
from kvik.sampling_params import SamplingParams  # noqa: E402
from kvik_apple.sampler import (  # noqa: E402
    MLXSampler,
    apply_logits_processors,
    apply_min_p,
    apply_top_k_top_p,
)

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


def _processor_batch() -> tuple[np.ndarray, SamplingBatch]:
    logits = _logits(6, seed=1)
    prompt, output = [1, 2, 3], [3, 4, 4, 9]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(logit_bias={7: 100.0, 8: -3.0}),
        SamplingParams(allowed_token_ids=[10, 11, 12], min_tokens=8, stop_token_ids=[11]),
        SamplingParams(bad_words_token_ids=[[5], [4, 9, 13], [3, 14]]),  # [5] always, [..., 13] matches the output end
        SamplingParams(min_tokens=2),  # already has 4 outputs: EOS stays allowed
    ]
    words = np.zeros((1, (VOCAB + 31) // 32), dtype=np.int32)
    words[0, 0] = (1 << 20) | (1 << 21)  # the grammar allows tokens 20 and 21 only
    batch = SamplingBatch(
        params=params,
        output_positions=[len(output)] * len(params),
        prompt_token_ids=[prompt] * len(params),
        output_token_ids=[output] * len(params),
        eos_token_ids=frozenset({2}),
        bitmask_rows=[0],
        bitmask=lambda: words,
    )
    return logits, batch


def test_logits_processors_match_the_torch_ones():
    from kvik.sample.logits_processors import DEFAULT_LOGITS_PROCESSORS

    logits, batch = _processor_batch()
    expected = torch.from_numpy(logits.copy())
    for processor in DEFAULT_LOGITS_PROCESSORS:
        expected = processor(expected, batch)
    got = np.array(apply_logits_processors(mx.array(logits), batch))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    assert np.isinf(got).sum() > 0  # the masks did something
    assert set(np.flatnonzero(np.isfinite(got[0]))) == {20, 21}


def test_greedy_follows_the_processed_logits():
    logits, batch = _processor_batch()
    batch.params = [p.clone(temperature=0.0) for p in batch.params]
    processed = np.array(apply_logits_processors(mx.array(logits), batch))
    assert np.array(MLXSampler()(mx.array(logits), batch)).tolist() == processed.argmax(-1).tolist()


def test_min_tokens_bans_eos():
    logits = _logits(1, seed=2)
    logits[0, 2] = 50.0  # EOS would win
    params = SamplingParams(temperature=0.0, min_tokens=3)
    eos = frozenset({2})
    early = MLXSampler()(mx.array(logits), _batch([params], [1], output_token_ids=[[5]], eos_token_ids=eos))
    late = MLXSampler()(mx.array(logits), _batch([params], [3], output_token_ids=[[5, 6, 7]], eos_token_ids=eos))
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


def test_logprobs_gather_matches_torch():
    from kvik.sample.logprobs import gather_logprobs as torch_gather
    from kvik_apple.logprobs import gather_logprobs

    logits = _logits(5, seed=4)
    targets = [3, 0, 63, 17, 17]
    ids, lps, ranks = (np.array(a) for a in gather_logprobs(mx.array(logits), mx.array(targets), 4))
    ref_logprobs = torch.log_softmax(torch.from_numpy(logits), dim=-1)  # the torch helper takes logprobs
    ref_ids, ref_lps, ref_ranks = torch_gather(ref_logprobs, torch.tensor(targets), 4)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(lps, ref_lps.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ranks, ref_ranks.numpy())
