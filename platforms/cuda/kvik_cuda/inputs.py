"""Step inputs through persistent pinned host buffers and persistent device buffers.

Each step fills numpy views of page-locked host memory and issues five small
asynchronous copies into device buffers that live as long as the runner.
Because the device buffers never move, CUDA graphs captured over slices of
them replay on whatever the latest step copied in.

Device buffers (R = max_num_seqs, T = max_num_batched_tokens, W = blocks per
max_model_len):
    ids, positions, slots   [T] int64
    req                     [2R + 1] int32: query_start_loc [0, R] | seq_lens [R+1, 2R]
    table_stage             [R * W] int32: this step's tables, packed [rows, cols]
    graph_tables            [R, W] int32: the fixed-stride copy captured graphs read
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from kvik.attention.backend import AttentionMetadata
from kvik.scheduling.output import ScheduledRequest


@dataclass(slots=True)
class PreparedStep:
    input_ids: torch.Tensor  # [num_tokens] int64 (device)
    positions: torch.Tensor  # [num_tokens] int64 (device)
    metadata: AttentionMetadata


class StepInputs:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        self.max_tokens, self.max_reqs, self.max_blocks = max_tokens, max_reqs, max_blocks
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"
        self.tok_host = torch.zeros((3, max_tokens), dtype=torch.int64, pin_memory=pin)
        self.req_host = torch.zeros(2 * max_reqs + 1, dtype=torch.int32, pin_memory=pin)
        self.table_host = torch.zeros(max_reqs * max_blocks, dtype=torch.int32, pin_memory=pin)
        self.tok_np, self.req_np, self.table_np = self.tok_host.numpy(), self.req_host.numpy(), self.table_host.numpy()
        self.ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slots = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.req = torch.zeros(2 * max_reqs + 1, dtype=torch.int32, device=device)
        self.table_stage = torch.zeros(max_reqs * max_blocks, dtype=torch.int32, device=device)
        self.graph_tables = torch.zeros((max_reqs, max_blocks), dtype=torch.int32, device=device)
        # Set after the copies of a step; waited on before the host buffers are refilled.
        self._copied: torch.cuda.Event | None = None
        # Block tables persist across steps, one row per live request: a decode step
        # only appends a block every block_size tokens, so rebuilding every table from
        # Python lists each step (~4 us per request) is wasted work.
        self.max_rows = 2 * max_reqs + 16  # running requests + those finished since the last step
        self.persist = np.zeros((self.max_rows, max_blocks), dtype=np.int32)
        self.row_len = [0] * self.max_rows  # block ids written per row
        self.row_last = [-1] * self.max_rows  # the last one written (detects a replaced table)
        self.rows_of: dict[str, int] = {}
        self.free_rows = list(range(self.max_rows - 1, -1, -1))

    def release(self, request_ids: list[str]) -> None:
        """Forget finished or preempted requests (their rows are reused)."""
        for rid in request_ids:
            row = self.rows_of.pop(rid, None)
            if row is not None:
                self.free_rows.append(row)

    def _rows_for(self, scheduled: list[ScheduledRequest], n_blocks: list[int]) -> list[int]:
        """Persistent table rows of the step's requests, with any new block ids appended."""
        if len(self.free_rows) < len(scheduled):  # ids were never released (e.g. profiling): start over
            self.rows_of.clear()
            self.free_rows = list(range(self.max_rows - 1, -1, -1))
        rows = []
        persist, row_len, row_last, rows_of = self.persist, self.row_len, self.row_last, self.rows_of
        for r, need in zip(scheduled, n_blocks, strict=True):
            ids = r.block_ids
            row = rows_of.get(r.request_id)
            if row is None:
                row = rows_of[r.request_id] = self.free_rows.pop()
                persist[row] = 0
                written = 0
            else:
                written = row_len[row]
                if written and (len(ids) < written or row_last[row] != ids[written - 1]):  # a new table: rewrite
                    written = 0
            if need > written:
                if len(ids) < need:
                    raise ValueError(
                        f"request {r.request_id!r} has {len(ids)} blocks for {r.start_pos + len(r.token_ids)} "
                        f"tokens (block size {self.block_size}); it needs {need}"
                    )
                persist[row, written:need] = ids[written:need]
                row_len[row] = need
                row_last[row] = ids[need - 1]
            rows.append(row)
        return rows

    def fits(self, scheduled: list[ScheduledRequest], rows: int | None = None) -> bool:
        rows = rows or len(scheduled)
        tokens = sum(len(r.token_ids) for r in scheduled) + rows - len(scheduled)
        longest = max(r.start_pos + len(r.token_ids) for r in scheduled)
        return rows <= self.max_reqs and tokens <= self.max_tokens and -(-longest // self.block_size) <= self.max_blocks

    def prepare(self, scheduled: list[ScheduledRequest], pad_to: int | None = None) -> PreparedStep:
        """Copy the step to the device; ``pad_to`` adds one-token dummy requests (for captured graphs).

        Dummy rows read and write only block 0, the block pool's null block.
        """
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the host buffers
        n = len(scheduled)
        rows = pad_to or n
        bs, R = self.block_size, self.max_reqs
        q_list = [len(r.token_ids) for r in scheduled]
        start_list = [r.start_pos for r in scheduled]
        q_lens = np.array(q_list, dtype=np.int64)
        starts = np.array(start_list, dtype=np.int64)
        seq_lens = starts + q_lens
        num_real = int(q_lens.sum())
        num_tokens = num_real + (rows - n)
        n_blocks = (-(-seq_lens // bs)).tolist()
        cols = max(n_blocks)

        req = self.req_np
        req[0] = 0
        np.cumsum(q_lens, out=req[1 : n + 1])
        req[n + 1 : rows + 1] = num_real + np.arange(1, rows - n + 1)
        req[R + 1 : R + 1 + n] = seq_lens
        req[R + 1 + n : R + 1 + rows] = 1

        table = self.table_np[: rows * cols].reshape(rows, cols)
        table[:n] = self.persist[self._rows_for(scheduled, n_blocks), :cols]
        table[n:] = 0

        tok = self.tok_np
        ids, pos, slots = tok[0, :num_tokens], tok[1, :num_tokens], tok[2, :num_tokens]
        if num_real == n:  # decode-only: one token per request
            ids[:n] = [r.token_ids[0] for r in scheduled]
            pos[:n] = starts
            owner = np.arange(n)
        else:
            ids[:num_real] = [t for r in scheduled for t in r.token_ids]
            owner = np.repeat(np.arange(n), q_lens)
            pos[:num_real] = np.arange(num_real) - np.repeat(req[:n] - starts, q_lens)
        slots[:num_real] = table[owner, pos[:num_real] // bs].astype(np.int64) * bs + pos[:num_real] % bs
        ids[num_real:] = 0
        pos[num_real:] = 0
        slots[num_real:] = 0  # the null block

        nb = torch.cuda.is_available() and self.device.type == "cuda"
        self.ids[:num_tokens].copy_(self.tok_host[0, :num_tokens], non_blocking=nb)
        self.positions[:num_tokens].copy_(self.tok_host[1, :num_tokens], non_blocking=nb)
        self.slots[:num_tokens].copy_(self.tok_host[2, :num_tokens], non_blocking=nb)
        self.req.copy_(self.req_host, non_blocking=nb)
        stage = self.table_stage[: rows * cols]
        stage.copy_(self.table_host[: rows * cols], non_blocking=nb)
        if pad_to is not None:
            self.graph_tables[:rows, :cols].copy_(stage.view(rows, cols))
            block_tables = self.graph_tables[:rows]
        else:
            block_tables = stage.view(rows, cols)
        if nb:
            self._copied = torch.cuda.Event()
            self._copied.record()

        query_lens_cpu = q_list + [1] * (rows - n)
        seq_lens_cpu = seq_lens.tolist() + [1] * (rows - n)
        metadata = AttentionMetadata(
            num_tokens=num_tokens,
            num_reqs=rows,
            query_start_loc=self.req[: rows + 1],
            seq_lens=self.req[R + 1 : R + 1 + rows],
            block_tables=block_tables,
            slot_mapping=self.slots[:num_tokens],
            block_size=bs,
            max_query_len=max(query_lens_cpu),
            max_seq_len=max(seq_lens_cpu),
            query_lens_cpu=query_lens_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )
        return PreparedStep(self.ids[:num_tokens], self.positions[:num_tokens], metadata)
