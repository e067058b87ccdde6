"""Turning a step's host arrays (sampled ids, gathered logprobs) into a :class:`RunnerOutput`.

Runners gather logprobs on their device in one shape (column 0: the chosen or
next prompt token; columns 1..k: the row's top ``k`` in order; plus the
chosen token's rank, 1 + the number of tokens strictly more likely), bring the
arrays to the host, and :func:`assemble_output` builds the engine's
dictionaries. Semantics are vLLM's raw logprobs (see ``kvik.sample.logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from kvik.sample.batch import PromptRows
from kvik.scheduling.output import RunnerOutput, ScheduledRequest

_request_id = attrgetter("request_id")


@dataclass(slots=True)
class TopLogprobs:
    """Gathered logprobs of ``n`` rows, on the host."""

    ids: np.ndarray  # [n, 1 + k] integer token ids
    logprobs: np.ndarray  # [n, 1 + k] float32
    ranks: np.ndarray  # [n] integer: rank of column 0's token


def _entries(top: TopLogprobs, start: int, ks: list[int]) -> list[dict[int, float]]:
    """Rows ``start..`` -> {token: logprob}, the chosen token first, then the row's own top k."""
    ids = top.ids[start : start + len(ks)].tolist()
    lps = top.logprobs[start : start + len(ks)].tolist()
    result = []
    for row_ids, row_lps, k in zip(ids, lps, ks, strict=True):
        entry = {row_ids[0]: row_lps[0]}
        for j in range(1, k + 1):
            entry.setdefault(row_ids[j], row_lps[j])
        result.append(entry)
    return result


def assemble_output(
    reqs: list[ScheduledRequest],
    sampled: np.ndarray,
    sample_logprobs: TopLogprobs | None = None,
    scheduled: list[ScheduledRequest] | None = None,
    prompt_rows: list[PromptRows] | None = None,
    prompt_logprobs: TopLogprobs | None = None,
) -> RunnerOutput:
    """The step's output: ``sampled`` [len(reqs)] are the tokens of ``reqs`` (the requests that sampled);
    ``sample_logprobs`` their gathered logprobs (rows of requests that did not ask are ignored);
    ``prompt_logprobs`` the rows of ``prompt_rows`` in order (requests indexed in ``scheduled``)."""
    # [n, 1].tolist() makes the one-token lists in C: no Python frame per request.
    ids = dict(zip(map(_request_id, reqs), sampled.reshape(-1, 1).tolist(), strict=True))
    output = RunnerOutput(sampled_token_ids=ids)
    if sample_logprobs is not None:
        ks = [r.sampling_params.logprobs for r in reqs]
        entries = _entries(sample_logprobs, 0, [k or 0 for k in ks])
        ranks = sample_logprobs.ranks.tolist()
        output.logprobs, output.logprob_ranks = {}, {}
        for i, (req, k) in enumerate(zip(reqs, ks, strict=True)):
            if k is not None:
                output.logprobs[req.request_id] = [entries[i]]
                output.logprob_ranks[req.request_id] = [int(ranks[i])]
    if prompt_logprobs is not None and prompt_rows:
        assert scheduled is not None, "prompt logprobs need the scheduled requests"
        output.prompt_logprobs, output.prompt_logprob_ranks = {}, {}
        start = 0
        for pr in prompt_rows:
            req = scheduled[pr.index]
            m = len(pr.targets)
            k = req.sampling_params.prompt_logprobs or 0
            output.prompt_logprobs[req.request_id] = _entries(prompt_logprobs, start, [k] * m)
            output.prompt_logprob_ranks[req.request_id] = prompt_logprobs.ranks[start : start + m].tolist()
            start += m
    return output
