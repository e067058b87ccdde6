"""Pooling in two halves: the runner's per-step reduction (torch) and the engine's per-request finish (numpy).

:class:`StepPooler` lives in the model runner. A pooling request may be
prefilled over several steps (chunked prefill), so it keeps what each pooling
type needs between chunks (the CLS state, a running sum) and emits the pooled
vector in the step that computes the request's last prompt token. The model's
``pooler_head`` (a classifier's score layer) then runs on the batch of vectors.

:func:`kvik.pooling.finish.finish_pooled` applies the request's options on the host (torch-free).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kvik.pooling.params import PoolingType
from kvik.scheduling.output import ScheduledRequest
from kvik.tensor_transfer import to_device


@dataclass(slots=True)
class _Partial:
    first: torch.Tensor | None = None  # CLS: the first token's state
    total: torch.Tensor | None = None  # MEAN: float32 sum of the states so far
    count: int = 0


class StepPooler:
    """Reduces each pooling request's hidden states to one row, across prefill chunks."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.head = head  # [P, hidden] -> [P, labels] (classifiers); None: the pooled state itself
        self._partial: dict[str, _Partial] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._partial.pop(request_id, None)

    def pool(
        self, hidden: torch.Tensor, scheduled: list[ScheduledRequest], query_start_loc: np.ndarray
    ) -> tuple[list[str], torch.Tensor | None]:
        """Feed this step's rows of every pooling request; return (finished ids, their float32 vectors)."""
        ids: list[str] = []
        rows: list[torch.Tensor | int | _Partial] = []  # a pooled vector, the hidden row to take, or a MEAN sum
        spans: list[tuple[int, int, _Partial]] = []  # MEAN: this step's rows of each request
        for i, sched in enumerate(scheduled):
            params = sched.pooling_params
            if params is None:
                continue
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            last = sched.start_pos + len(sched.token_ids) >= len(sched.prompt_token_ids)
            kind = params.pooling_type or PoolingType.LAST
            if kind is PoolingType.LAST:
                if last:
                    ids.append(sched.request_id)
                    rows.append(end - 1)
                continue
            state = self._partial.get(sched.request_id)
            if state is None or sched.start_pos == 0:  # new, or recomputed from 0 after a preemption
                state = self._partial[sched.request_id] = _Partial()
            if kind is PoolingType.CLS:
                if sched.start_pos == 0:
                    state.first = hidden[start].float()
            else:
                spans.append((start, end, state))
                state.count += end - start
            if last:
                del self._partial[sched.request_id]
                ids.append(sched.request_id)
                if kind is PoolingType.CLS:
                    assert state.first is not None, "a CLS-pooled request must be prefilled from position 0"
                    rows.append(state.first)
                else:
                    rows.append(state)
        if spans:
            # Every MEAN chunk of the step summed in one reduction (a kernel per request cost more
            # than the encoder's forward at 64 requests a step), each row in float32.
            sums = _span_sums(hidden, [(a, b) for a, b, _ in spans])
            for (_, _, state), chunk in zip(spans, sums, strict=True):
                state.total = chunk if state.total is None else state.total + chunk
        if not rows:
            return ids, None
        finished = [r for r in rows if isinstance(r, _Partial)]
        means: Iterator[torch.Tensor] = iter(())
        if finished:  # the MEAN requests that end here: their sums divided by their counts in one op
            counts = to_device(torch.tensor([r.count for r in finished], dtype=torch.float32), hidden.device)
            totals = [r.total for r in finished]
            assert all(t is not None for t in totals), "a MEAN request ends in a step that summed its rows"
            means = iter(torch.stack(totals) / counts[:, None])  # type: ignore[arg-type]
        vectors = [next(means) if isinstance(r, _Partial) else r for r in rows]
        if all(isinstance(r, int) for r in vectors):  # the common case (decoder embedders, classifiers): one gather
            index = to_device(torch.tensor(vectors, dtype=torch.int64), hidden.device)
            pooled = hidden.index_select(0, index).float()
        else:
            pooled = torch.stack([hidden[r].float() if isinstance(r, int) else r for r in vectors])
        if self.head is not None:
            pooled = self.head(pooled).float()
        return ids, pooled


def _span_sums(hidden: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """``[len(spans), hidden]`` float32: the sum of ``hidden[a:b]`` for each span.

    One padded gather and one reduction, with no host synchronisation (torch.segment_reduce waits for
    the device, which under async scheduling is the forward in flight): ``[spans, longest, hidden]``
    rows, the padding zeroed.
    """
    starts = np.array([a for a, _ in spans], dtype=np.int64)
    lengths = np.array([b - a for a, b in spans], dtype=np.int64)
    length = int(lengths[0])
    if (lengths == length).all() and (starts == starts[0] + length * np.arange(len(spans))).all():
        # Back-to-back spans of one length (an encoder step of equal texts): a view, nothing gathered.
        first = int(starts[0])
        return hidden[first : first + length * len(spans)].view(len(spans), length, -1).float().sum(dim=1)
    offsets = np.arange(int(lengths.max()), dtype=np.int64)
    index = starts[:, None] + np.minimum(offsets[None, :], lengths[:, None] - 1)  # padding repeats a row
    valid = offsets[None, :] < lengths[:, None]
    rows = hidden.index_select(0, to_device(torch.from_numpy(index.reshape(-1)), hidden.device))
    rows = rows.view(len(spans), -1, hidden.shape[-1]).float()
    rows.masked_fill_(~to_device(torch.from_numpy(valid), hidden.device)[..., None], 0.0)
    return rows.sum(dim=1)
