"""Sample and prompt logprobs in MLX, with the torch runner's semantics (kvik.sample.logprobs).

Raw-distribution logprobs (``log_softmax`` of the logits before any
processor or filter); each entry holds the chosen / next prompt token first,
then the row's top ``k``; the chosen token's rank is 1 + the number of tokens
strictly more likely.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from kvik.sample.logprobs import PromptRows
from kvik.scheduling.output import RunnerOutput, ScheduledRequest


def gather_logprobs(logits: mx.array, targets: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """logits [n, vocab], targets [n] -> (ids [n, 1 + k], logprobs [n, 1 + k], target ranks [n]), lazily."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    target_lp = mx.take_along_axis(logprobs, targets[:, None], axis=-1)  # [n, 1]
    ranks = mx.sum(logprobs > target_lp, axis=-1) + 1
    ids, lps = targets[:, None].astype(mx.int32), target_lp
    if k > 0:
        top = mx.argsort(-logprobs, axis=-1)[:, :k].astype(mx.int32)
        ids = mx.concatenate([ids, top], axis=1)
        lps = mx.concatenate([lps, mx.take_along_axis(logprobs, top, axis=-1)], axis=1)
    return ids, lps, ranks


def _entries(ids: np.ndarray, lps: np.ndarray, ks: list[int]) -> list[dict[int, float]]:
    result = []
    for i, k in enumerate(ks):
        entry = {int(ids[i, 0]): float(lps[i, 0])}
        for j in range(1, k + 1):
            entry.setdefault(int(ids[i, j]), float(lps[i, j]))
        result.append(entry)
    return result


def add_sample_logprobs(
    output: RunnerOutput, reqs: list[ScheduledRequest], gathered: tuple[mx.array, mx.array, mx.array]
) -> None:
    """Fill ``output.logprobs`` / ``logprob_ranks`` for the rows of ``reqs`` that asked (evaluated arrays)."""
    ids, lps, ranks = (np.array(a) for a in gathered)
    ks = [r.sampling_params.logprobs for r in reqs]
    entries = _entries(ids, lps, [k or 0 for k in ks])
    output.logprobs, output.logprob_ranks = {}, {}
    for i, (req, k) in enumerate(zip(reqs, ks, strict=True)):
        if k is not None:
            output.logprobs[req.request_id] = [entries[i]]
            output.logprob_ranks[req.request_id] = [int(ranks[i])]


def add_prompt_logprobs(
    output: RunnerOutput,
    scheduled: list[ScheduledRequest],
    prompt_rows: list[PromptRows],
    gathered: tuple[mx.array, mx.array, mx.array],
) -> None:
    """Fill ``output.prompt_logprobs`` / ``prompt_logprob_ranks`` (rows in ``prompt_rows`` order)."""
    ids, lps, ranks = (np.array(a) for a in gathered)
    output.prompt_logprobs, output.prompt_logprob_ranks = {}, {}
    start = 0
    for pr in prompt_rows:
        req = scheduled[pr.index]
        stop = start + len(pr.targets)
        k = req.sampling_params.prompt_logprobs or 0
        output.prompt_logprobs[req.request_id] = _entries(ids[start:stop], lps[start:stop], [k] * (stop - start))
        output.prompt_logprob_ranks[req.request_id] = ranks[start:stop].tolist()
        start = stop
