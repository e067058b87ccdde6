"""The verify step on a torch runner: score every drafted position, accept a prefix, one token more.

A request scheduled with ``k`` drafts has ``k + 1`` rows in the step: its last
real token and the drafts. Row ``j`` predicts the token after draft ``j - 1``,
so the sampling batch gets one row per position, each with the history it would
have had (output + the drafts before it): penalties, min_tokens, seeds and
logprobs then see exactly what a non-speculative step would. The sampler's
:meth:`~kvik.sample.sampler.Sampler.verify` applies the rejection rule per row;
here the rows are walked per request: drafts are kept while accepted, and the
first rejected row (or the bonus row after the last draft) contributes its own
sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from kvik.sample.batch import SamplingBatch
from kvik.sample.logprobs import start_sample_output
from kvik.sample.sampler import Sampler
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import RunnerOutput, ScheduledRequest
from kvik.tensor_transfer import to_device
from kvik.worker.interface import StepHandle

if TYPE_CHECKING:
    from kvik.structured.manager import StructuredStep
    from kvik.worker.kit.layout import StepLayout


@dataclass(slots=True)
class _Row:
    """What logprob assembly reads of a scored position (a unique id per row)."""

    request_id: str
    sampling_params: SamplingParams


@dataclass(slots=True)
class VerifyRows:
    """The rows a step scores: per sampling request, ``k + 1`` consecutive token rows."""

    token_rows: np.ndarray  # [R] rows of the step's hidden states
    draft_ids: list[int]  # [R] the drafted token each row checks (-1: bonus row)
    counts: list[int]  # per request: k + 1
    batch: SamplingBatch


def verify_rows(layout: StepLayout, eos_token_ids: frozenset[int], structured: StructuredStep | None) -> VerifyRows:
    """The rows to score. Grammar-constrained requests carry no drafts (the engine proposes none for them)."""
    reqs = layout.sampling_requests()
    ends = layout.logits_indices.tolist()
    rows: list[int] = []
    drafts: list[int] = []
    counts: list[int] = []
    batch = SamplingBatch(params=[], output_positions=[], eos_token_ids=eos_token_ids)
    for req, end in zip(reqs, ends, strict=True):
        d = req.draft_token_ids
        k = len(d)
        base = len(req.output_token_ids) + req.num_pending_outputs
        rows.extend(range(end - k, end + 1))
        drafts.extend(d)
        drafts.append(-1)
        counts.append(k + 1)
        for j in range(k + 1):
            batch.params.append(req.sampling_params)
            batch.output_positions.append(base + j)
            batch.prompt_token_ids.append(req.prompt_token_ids)
            batch.output_token_ids.append(req.output_token_ids + d[:j] if j else req.output_token_ids)
    if structured is not None and structured.request_ids:
        first = np.cumsum([0, *counts]).tolist()
        index = {r.request_id: i for i, r in enumerate(reqs)}
        batch.bitmask_rows = []
        for rid in structured.request_ids:
            i = index[rid]
            if counts[i] != 1:
                raise RuntimeError(f"request {rid!r} is grammar-constrained and must not carry draft tokens")
            batch.bitmask_rows.append(first[i])
        batch.bitmask = structured.bitmask
    return VerifyRows(np.asarray(rows, dtype=np.int64), drafts, counts, batch)


def sample_verify(
    sampler: Sampler,
    logits: torch.Tensor,
    vrows: VerifyRows,
    layout: StepLayout,
    prompt_logits: torch.Tensor | None,
    draft_probs: torch.Tensor | None = None,
) -> StepHandle:
    """Accept drafts and sample; start the host copy. ``logits`` [R, vocab] are at ``vrows.token_rows``;
    ``draft_probs`` [R, vocab] are the distributions sampled drafts were drawn from (None: all drafts
    are deterministic)."""
    reqs = layout.sampling_requests()
    batch = vrows.batch
    raw = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in batch.params) else None
    accepted, sampled = sampler.verify(logits, batch, vrows.draft_ids, draft_probs)
    drafts = to_device(torch.tensor(vrows.draft_ids, dtype=torch.int64), logits.device)
    chosen = torch.where(accepted, drafts, sampled)
    accepted_host = accepted.cpu()  # the verify step is synchronous: this copy does not stall a pipeline
    rows = [
        _Row(f"{req.request_id}\x00{j}", req.sampling_params)
        for req, count in zip(reqs, vrows.counts, strict=True)
        for j in range(count)
    ]
    finish = start_sample_output(
        chosen, raw, cast(list[ScheduledRequest], rows), prompt_logits, layout.prompt_rows, layout.scheduled
    )

    def collapse() -> RunnerOutput:
        per_row = finish()
        flags = accepted_host.numpy()
        out = RunnerOutput(
            sampled_token_ids={},
            prompt_logprobs=per_row.prompt_logprobs,
            prompt_logprob_ranks=per_row.prompt_logprob_ranks,
        )
        if per_row.logprobs is not None:
            out.logprobs, out.logprob_ranks = {}, {}
        start = 0
        for req, count in zip(reqs, vrows.counts, strict=True):
            keep = 1
            while keep < count and flags[start + keep - 1]:
                keep += 1  # row keep-1 accepted its draft: row keep's token counts too
            ids = [rows[start + j].request_id for j in range(keep)]
            out.sampled_token_ids[req.request_id] = [per_row.sampled_token_ids[i][0] for i in ids]
            if out.logprobs is not None and per_row.logprobs and ids[0] in per_row.logprobs:
                out.logprobs[req.request_id] = [per_row.logprobs[i][0] for i in ids]
                assert out.logprob_ranks is not None and per_row.logprob_ranks is not None
                out.logprob_ranks[req.request_id] = [per_row.logprob_ranks[i][0] for i in ids]
            start += count
        return out

    return StepHandle(collapse)
