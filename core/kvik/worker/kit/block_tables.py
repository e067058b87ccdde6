"""Persistent block tables: one numpy row per live request, kept up to date from the scheduler's deltas.

The scheduler sends each request's block ids once: the whole table the first
time the request is scheduled (and again after a preemption), then only the
blocks appended since (``ScheduledRequest.new_block_ids``, with
``full_block_table`` saying which). A runner keeps the tables here and gathers
each step's ``[num_reqs, cols]`` table from them (:class:`~kvik.worker.kit.layout.StepLayout`),
so a decode step, which appends a block only every ``block_size`` tokens,
costs no per-block work on the host.

Rows of finished and preempted requests are dropped when a
``SchedulerOutput`` names them. Entries past a row's length are always 0 (the
null block), so gathered tables come out padded with 0.

With several KV-cache groups (:mod:`kvik.scheduling.kv_cache_groups`) a row holds ``num_groups`` ids per
block position, interleaved as the scheduler sends them; :class:`~kvik.worker.kit.layout.StepLayout`
splits them into one table per group.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter

import numpy as np

from kvik.scheduling.output import SchedulerOutput

_request_id = attrgetter("request_id")
_new_block_ids = attrgetter("new_block_ids")
_full_block_table = attrgetter("full_block_table")


class BlockTables:
    """Block ids per request, as rows of one ``[rows, cols]`` int32 array that grows on demand."""

    def __init__(self, rows: int = 16, cols: int = 16, num_groups: int = 1) -> None:
        self.num_groups = num_groups  # ids per block position (KV-cache groups, interleaved)
        self.table = np.zeros((max(rows, 1), max(cols, 1)), dtype=np.int32)  # [rows, cols]
        self.num_blocks = np.zeros(max(rows, 1), dtype=np.int64)  # [rows] ids held per row
        self._row_of: dict[str, int] = {}
        self._free = list(range(self.table.shape[0] - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._row_of

    def block_ids(self, request_id: str) -> list[int]:
        """The request's table as held here (empty for an unknown request)."""
        row = self._row_of.get(request_id)
        return [] if row is None else self.table[row, : self.num_blocks[row]].tolist()

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget requests (finished, aborted or preempted); their rows are reused."""
        for rid in request_ids:
            row = self._row_of.pop(rid, None)
            if row is not None:
                self.table[row, : self.num_blocks[row]] = 0
                self.num_blocks[row] = 0
                self._free.append(row)

    def apply(self, scheduler_output: SchedulerOutput) -> np.ndarray:
        """Apply one step's deltas; return the row of each scheduled request, [num_scheduled] int64.

        Rows named in ``finished_request_ids`` / ``preempted_request_ids`` are
        dropped first (a new request may reuse a finished one's id in the same step).
        """
        if scheduler_output.finished_request_ids:
            self.drop(scheduler_output.finished_request_ids)
        if scheduler_output.preempted_request_ids:
            self.drop(scheduler_output.preempted_request_ids)
        scheduled = scheduler_output.scheduled
        row_of = self._row_of
        # Mostly (a decode step) every request has a row and no new block: three C-level passes,
        # then Python only for the requests with work (a new row, a whole table, appended blocks).
        found = list(map(row_of.get, map(_request_id, scheduled)))
        if None in found or any(map(_new_block_ids, scheduled)) or any(map(_full_block_table, scheduled)):
            for i, req in enumerate(scheduled):
                row, ids = found[i], req.new_block_ids
                if row is not None and not ids and not req.full_block_table:
                    continue
                if row is None:
                    row = found[i] = self._new_row(req.request_id)
                if req.full_block_table:
                    held = int(self.num_blocks[row])
                    if held > len(ids):
                        self.table[row, len(ids) : held] = 0
                    self._write(row, 0, ids)
                elif ids:
                    self._write(row, int(self.num_blocks[row]), ids)
        return np.array(found, dtype=np.int64)

    def _write(self, row: int, start: int, ids: list[int]) -> None:
        end = start + len(ids)
        if end > self.table.shape[1]:
            self._grow(cols=end)
        self.table[row, start:end] = ids
        self.num_blocks[row] = end

    def _new_row(self, request_id: str) -> int:
        if not self._free:
            self._grow(rows=2 * self.table.shape[0])
        row = self._row_of[request_id] = self._free.pop()
        return row

    def _grow(self, rows: int = 0, cols: int = 0) -> None:
        old_rows, old_cols = self.table.shape
        new_rows, new_cols = max(rows, old_rows), max(cols, 2 * old_cols if cols else old_cols)
        table = np.zeros((new_rows, new_cols), dtype=np.int32)
        table[:old_rows, :old_cols] = self.table
        self.table = table
        if new_rows > old_rows:
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros(new_rows - old_rows, dtype=np.int64)])
            self._free.extend(range(new_rows - 1, old_rows - 1, -1))
