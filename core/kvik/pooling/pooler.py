"""Pooling in two halves: the runner's per-step reduction (torch) and the engine's per-request finish (numpy).

:class:`StepPooler` lives in the model runner. A pooling request may be
prefilled over several steps (chunked prefill), so it keeps what each pooling
type needs between chunks (the CLS state, a running sum) and emits the pooled
vector in the step that computes the request's last prompt token. The model's
``pooler_head`` (a classifier's score layer) then runs on the batch of vectors.

:func:`kvik.pooling.finish.finish_pooled` applies the request's options on the host (torch-free).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from kvik.pooling.params import PoolingType
from kvik.scheduling.output import ScheduledRequest


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
        rows: list[torch.Tensor | int] = []  # a pooled vector, or the hidden row a LAST request pools
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
                chunk = hidden[start:end].float().sum(dim=0)
                state.total = chunk if state.total is None else state.total + chunk
                state.count += end - start
            if last:
                del self._partial[sched.request_id]
                vector = state.first if kind is PoolingType.CLS else state.total
                assert vector is not None, "a CLS-pooled request must be prefilled from position 0"
                if kind is PoolingType.MEAN:
                    vector = vector / state.count
                ids.append(sched.request_id)
                rows.append(vector)
        if not rows:
            return ids, None
        if all(isinstance(r, int) for r in rows):  # the common case (decoder embedders, classifiers): one gather
            index = torch.tensor(rows, dtype=torch.int64).to(hidden.device, non_blocking=True)
            pooled = hidden.index_select(0, index).float()
        else:
            pooled = torch.stack([hidden[r].float() if isinstance(r, int) else r for r in rows])
        if self.head is not None:
            pooled = self.head(pooled).float()
        return ids, pooled
