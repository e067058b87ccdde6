"""Step inputs through persistent pinned host buffers and persistent device buffers.

The runner kit writes each step's layout straight into numpy views of
page-locked host memory (:attr:`StepInputs.host`, passed to
``StepLayout.build(buffers=...)``); :meth:`StepInputs.copy` then issues five
small asynchronous copies into device buffers that live as long as the runner.
Because the device buffers never move, CUDA graphs captured over slices of
them replay on whatever the latest step copied in.

Device buffers (R = max_num_seqs, T = max_num_batched_tokens, W = blocks per
max_model_len, G = KV-cache groups, kvik.scheduling.kv_cache_groups):
    ids, positions          [T] int64
    slots                   [G, T] int64
    req                     [2R + 1] int32: query_start_loc [0, R] | seq_lens [R+1, 2R]
    table_stage             [G * R * W] int32: this step's tables, packed [G, rows, cols]
    graph_tables            [G, R, W] int32: the fixed-stride copy captured graphs read
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvik.attention.backend import AttentionMetadata
from kvik.worker.kit import LayoutBuffers, StepLayout


@dataclass(slots=True)
class PreparedStep:
    input_ids: torch.Tensor  # [num_tokens] int64 (device)
    positions: torch.Tensor  # [num_tokens] int64 (device)
    metadata: AttentionMetadata[torch.Tensor]


class StepInputs:
    def __init__(
        self, max_tokens: int, max_reqs: int, max_blocks: int, device: torch.device, num_groups: int = 1
    ) -> None:
        self.max_tokens, self.max_reqs, self.max_blocks = max_tokens, max_reqs, max_blocks
        self.num_groups = num_groups
        self.device = device
        pin = device.type == "cuda"
        self.tok_host = torch.zeros((2 + num_groups, max_tokens), dtype=torch.int64, pin_memory=pin)
        self.req_host = torch.zeros(2 * max_reqs + 1, dtype=torch.int32, pin_memory=pin)
        self.table_host = torch.zeros(num_groups * max_reqs * max_blocks, dtype=torch.int32, pin_memory=pin)
        tok, req = self.tok_host.numpy(), self.req_host.numpy()
        # The kit writes layouts here (numpy views of the pinned memory: no extra host copy).
        self.host = LayoutBuffers(
            token_ids=tok[0],
            positions=tok[1],
            slot_mapping=tok[2:],
            query_start_loc=req[: max_reqs + 1],
            seq_lens=req[max_reqs + 1 :],
            block_table=self.table_host.numpy(),
        )
        self.ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slots = torch.zeros((num_groups, max_tokens), dtype=torch.int64, device=device)
        self.req = torch.zeros(2 * max_reqs + 1, dtype=torch.int32, device=device)
        self.table_stage = torch.zeros(num_groups * max_reqs * max_blocks, dtype=torch.int32, device=device)
        self.graph_tables = torch.zeros((num_groups, max_reqs, max_blocks), dtype=torch.int32, device=device)
        # Set after the copies of a step; waited on before the host buffers are refilled.
        self._copied: torch.cuda.Event | None = None

    def wait_host(self) -> None:
        """Block until the last step's copies have read the host buffers (call before refilling them)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def copy(self, layout: StepLayout) -> PreparedStep:
        """Copy a layout built in :attr:`host` to the device buffers.

        A padded layout (a decode batch padded to a graph's size, ``pad_to``) also gets its
        table copied to the fixed-stride ``graph_tables`` that captured graphs read.
        """
        assert layout.buffers is self.host, "the layout was not built in this StepInputs' host buffers"
        rows, num_tokens, R, G = layout.num_reqs, layout.num_tokens, self.max_reqs, self.num_groups
        cols = layout.block_table.shape[1]
        nb = torch.cuda.is_available() and self.device.type == "cuda"
        self.ids[:num_tokens].copy_(self.tok_host[0, :num_tokens], non_blocking=nb)
        self.positions[:num_tokens].copy_(self.tok_host[1, :num_tokens], non_blocking=nb)
        self.slots[:, :num_tokens].copy_(self.tok_host[2:, :num_tokens], non_blocking=nb)
        self.req.copy_(self.req_host, non_blocking=nb)
        stage = self.table_stage[: G * rows * cols]
        stage.copy_(self.table_host[: G * rows * cols], non_blocking=nb)
        if layout.padded_to is not None:
            self.graph_tables[:, :rows, :cols].copy_(stage.view(G, rows, cols))
            block_tables = self.graph_tables[:, :rows]
        else:
            block_tables = stage.view(G, rows, cols)
        if nb:
            self._copied = torch.cuda.Event()
            self._copied.record()
        metadata = AttentionMetadata(
            num_tokens=num_tokens,
            num_reqs=rows,
            query_start_loc=self.req[: rows + 1],
            seq_lens=self.req[R + 1 : R + 1 + rows],
            block_tables=block_tables[0],
            slot_mapping=self.slots[0, :num_tokens],
            block_size=layout.block_size,
            max_query_len=layout.max_query_len,
            max_seq_len=layout.max_seq_len,
            query_lens_cpu=layout.query_lens_cpu,
            seq_lens_cpu=layout.seq_lens_cpu,
            num_padding_reqs=layout.num_reqs - len(layout.scheduled),
        )
        if G > 1:
            metadata.add_kv_groups(block_tables[1:].unbind(), self.slots[1:, :num_tokens].unbind())
        return PreparedStep(self.ids[:num_tokens], self.positions[:num_tokens], metadata)
