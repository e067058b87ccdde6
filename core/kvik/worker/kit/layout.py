"""One step flattened into host arrays, built once from a ``SchedulerOutput``.

Every runner needs the same numbers for a step: the scheduled tokens of all
requests back to back, each one's position and KV-cache slot, where each
request's rows start, its context length, its block-table row, and which
rows are sampled. :meth:`StepLayout.build` computes them with vectorised
numpy (the only Python loops are over requests, never over tokens or blocks)
and a runner copies them to its device in whatever form it likes: torch
tensors, MLX arrays, or persistent pinned buffers (pass ``buffers``).

``pad_to`` appends one-token dummy requests (a decode batch padded to a
captured graph's size); they sit at position 0 of the null block 0, which the
block pool never hands out, so they read and write nothing real.
``pad_tokens_to`` (with ``pad_to``) also fixes the token count: the last dummy
request absorbs every padding token beyond one per dummy (a speculative verify
step padded to a captured graph's shape). Its tokens all sit at position 0 and
write slot 0 of the null block; its context is as long as its query (so a
kernel's causal arithmetic holds) and its table row is all null block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter

import numpy as np

from kvik.sample.batch import PromptRows, prompt_logprob_rows
from kvik.scheduling.output import ScheduledRequest
from kvik.worker.kit.block_tables import BlockTables

_token_ids = attrgetter("token_ids")
_start_pos = attrgetter("start_pos")
_sample = attrgetter("sample")
_pending = attrgetter("num_pending_tokens")
_request_id = attrgetter("request_id")
_first = itemgetter(0)
_NONE = np.zeros(0, dtype=np.int64)


@dataclass(slots=True)
class LayoutBuffers:
    """Preallocated host arrays a layout is written into (e.g. numpy views of pinned memory).

    A layout of ``T`` tokens, ``R`` requests and ``C`` table columns uses the
    first ``T`` / ``R + 1`` / ``R`` entries and packs its table ``[R, C]`` at
    the front of ``block_table``.
    """

    token_ids: np.ndarray  # [max_tokens] int64
    positions: np.ndarray  # [max_tokens] int64
    slot_mapping: np.ndarray  # [num_groups, max_tokens] int64: one row per KV-cache group
    query_start_loc: np.ndarray  # [max_reqs + 1] int32
    seq_lens: np.ndarray  # [max_reqs] int32
    block_table: np.ndarray  # [num_groups * max_reqs * max_blocks] int32, flat

    @classmethod
    def allocate(cls, max_tokens: int, max_reqs: int, max_blocks: int, num_groups: int = 1) -> LayoutBuffers:
        tokens = np.zeros((2 + num_groups, max_tokens), dtype=np.int64)
        return cls(
            tokens[0],
            tokens[1],
            tokens[2:],
            np.zeros(max_reqs + 1, dtype=np.int32),
            np.zeros(max_reqs, dtype=np.int32),
            np.zeros(num_groups * max_reqs * max_blocks, dtype=np.int32),
        )

    def fits(self, num_tokens: int, num_reqs: int, cols: int, num_groups: int = 1) -> bool:
        return (
            num_tokens <= self.token_ids.shape[0]
            and num_reqs <= self.seq_lens.shape[0]
            and num_groups == self.slot_mapping.shape[0]
            and num_groups * num_reqs * cols <= self.block_table.shape[0]
        )


@dataclass(slots=True)
class StepLayout:
    """A step's host-side arrays. ``R`` rows of requests (the scheduled ones, then any padding),
    ``T`` token rows (each request's tokens back to back, then one per padding request)."""

    scheduled: list[ScheduledRequest]
    num_reqs: int  # R, padding included
    num_tokens: int  # T, padding included
    num_scheduled_tokens: int  # tokens of the scheduled requests (the first rows)
    token_ids: np.ndarray  # [T] int64; a pending token's row holds 0 until the runner fills it
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64: block_id * block_size + offset (the first KV-cache group's)
    query_start_loc: np.ndarray  # [R + 1] int32
    seq_lens: np.ndarray  # [R] int32: cached + new tokens
    block_table: np.ndarray  # [R, cols] int32, padded with 0 (the null block; the first group's)
    # Every KV-cache group's (kvik.scheduling.kv_cache_groups; one group: [1, ...] of the two above).
    slot_mappings: np.ndarray  # [G, T] int64
    block_tables: np.ndarray  # [G, R, cols] int32
    block_size: int
    query_lens_cpu: list[int]  # [R]
    seq_lens_cpu: list[int]  # [R]
    max_query_len: int
    max_seq_len: int
    # Sampling: the scheduled requests with sample=True, and the token row whose logits they sample.
    sample_index: np.ndarray  # [S] int64, indices into ``scheduled``
    logits_indices: np.ndarray  # [S] int64, token rows
    # Async scheduling: rows whose token the previous step is still sampling, and whose it is.
    pending_rows: np.ndarray  # [P] int64
    pending_request_ids: list[str]
    # Prompt logprobs: per request asking for them, the rows that score its next prompt token.
    prompt_rows: list[PromptRows] = field(default_factory=list)
    buffers: LayoutBuffers | None = None  # the preallocated arrays written into, if any
    # The batch size asked for with ``pad_to`` (num_reqs == padded_to, possibly with no padding
    # row at all); None when not asked or when the padded step did not fit ``buffers``.
    # (With ``pad_tokens_to``, num_tokens is that count whenever padded_to is set.)
    padded_to: int | None = None

    @property
    def num_scheduled(self) -> int:
        return len(self.scheduled)

    @property
    def samples_every_row(self) -> bool:
        """Every scheduled token is sampled (a decode-only step): logits rows are ``0..S-1``."""
        return self.logits_indices.shape[0] == self.num_scheduled_tokens

    def sampling_requests(self) -> list[ScheduledRequest]:
        """The requests that sample, in logits-row order."""
        scheduled = self.scheduled
        if self.sample_index.shape[0] == len(scheduled):  # indices are distinct and ascending: all of them
            return list(scheduled)
        return [scheduled[i] for i in self.sample_index.tolist()]

    @classmethod
    def build(
        cls,
        scheduled: list[ScheduledRequest],
        tables: BlockTables,
        rows: np.ndarray,
        block_size: int,
        *,
        buffers: LayoutBuffers | None = None,
        pad_to: int | None = None,
        pad_tokens_to: int | None = None,
    ) -> StepLayout:
        """Flatten ``scheduled`` (non-empty) whose block-table rows in ``tables`` are ``rows``.

        ``pad_to``: append dummy requests up to that many; ``pad_tokens_to`` (needs ``pad_to``
        above the step's request count): the last dummy takes every token that brings the step
        to that many (at least one). Writes into ``buffers`` when the step fits them, else into
        fresh arrays (then ``layout.buffers`` is None and no padding is added).
        ValueError when a request's table holds too few blocks for its tokens, or the padding
        asked for cannot be made.
        """
        n = len(scheduled)
        bs = block_size
        groups = tables.num_groups
        q_lens = np.fromiter(map(len, map(_token_ids, scheduled)), dtype=np.int64, count=n)
        starts = np.fromiter(map(_start_pos, scheduled), dtype=np.int64, count=n)
        seq_lens = starts + q_lens
        num_real = int(q_lens.sum())
        need = -(-seq_lens // bs)
        held = tables.num_blocks[rows] // groups  # block positions
        short = held < need
        if short.any():
            i = int(short.nonzero()[0][0])
            raise ValueError(
                f"request {scheduled[i].request_id!r} has {int(held[i])} blocks for {int(seq_lens[i])} tokens "
                f"(block size {bs}); it needs {int(need[i])}"
            )
        cols = real_cols = int(need.max())
        if pad_to is not None and pad_to < n:
            raise ValueError(f"pad_to={pad_to} is smaller than the step's {n} requests")
        num_reqs = n if pad_to is None else pad_to
        num_tokens = num_real + num_reqs - n
        # The dummy requests' query lengths: one token each, the last one absorbing the rest.
        pad_lens = np.ones(num_reqs - n, dtype=np.int64)
        if pad_tokens_to is not None:
            if num_reqs <= n or pad_tokens_to < num_tokens:
                raise ValueError(
                    f"pad_tokens_to={pad_tokens_to} with pad_to={pad_to} cannot hold a step of {n} requests and "
                    f"{num_real} tokens: it needs pad_to > {n} and pad_tokens_to >= {num_tokens}"
                )
            pad_lens[-1] += pad_tokens_to - num_tokens
            num_tokens = pad_tokens_to
            cols = max(cols, -(-int(pad_lens[-1]) // bs))
        if buffers is not None and not buffers.fits(num_tokens, num_reqs, cols, groups):
            buffers, num_reqs, num_tokens, pad_to, pad_lens = None, n, num_real, None, pad_lens[:0]
            cols = real_cols  # the absorber's width goes with it
        out = buffers or LayoutBuffers.allocate(num_tokens, num_reqs, cols, groups)

        padded = num_reqs > n
        qsl = out.query_start_loc[: num_reqs + 1]
        qsl[0] = 0
        np.cumsum(q_lens, out=qsl[1 : n + 1])
        sl = out.seq_lens[:num_reqs]
        sl[:n] = seq_lens
        group_tables = out.block_table[: groups * num_reqs * cols].reshape(groups, num_reqs, cols)
        table = group_tables[0]
        if groups > 1:  # rows hold each position's groups side by side: one table per group
            group_tables[:, :n, real_cols:] = 0
            interleaved = tables.table[rows, : real_cols * groups].reshape(n, real_cols, groups)
            group_tables[:, :n, :real_cols] = interleaved.transpose(2, 0, 1)
        elif cols == real_cols:
            np.take(tables.table[:, :cols], rows, axis=0, out=table[:n])
        else:  # an absorber wider than every real table: the real rows end in null blocks
            table[:n, real_cols:] = 0
            table[:n, :real_cols] = tables.table[rows, :real_cols]

        ids, pos = out.token_ids[:num_tokens], out.positions[:num_tokens]
        group_slots = out.slot_mapping[:, :num_tokens]
        slots = group_slots[0]
        decode_only = num_real == n  # one token per request (the hot case: few numpy calls)
        if decode_only:
            ids[:n] = np.fromiter(map(_first, map(_token_ids, scheduled)), dtype=np.int64, count=n)
            pos[:n] = starts
            ends = owner = np.arange(n)  # [n] each request's (only and last) row
            real_pos = starts
        else:
            ids[:num_real] = np.fromiter(
                itertools.chain.from_iterable(map(_token_ids, scheduled)), dtype=np.int64, count=num_real
            )
            owner = np.repeat(np.arange(n), q_lens)  # [num_real] the request of each token
            pos[:num_real] = np.arange(num_real) - np.repeat(qsl[:n] - starts, q_lens)
            real_pos = pos[:num_real]
            ends = qsl[1 : n + 1].astype(np.int64) - 1  # [n] each request's last row
        block_of, offset = real_pos // bs, real_pos % bs
        for g in range(groups):
            group_slots[g, :num_real] = group_tables[g][owner, block_of].astype(np.int64) * bs + offset
        if padded:  # dummy requests at position 0 of the null block
            np.cumsum(pad_lens, out=qsl[n + 1 :])
            qsl[n + 1 :] += num_real
            sl[n:] = pad_lens  # a dummy's context is its own query (one token, or the absorber's)
            group_tables[:, n:] = 0
            ids[num_real:] = 0
            pos[num_real:] = 0
            group_slots[:, num_real:] = 0

        samples = np.fromiter(map(_sample, scheduled), dtype=bool, count=n)
        sample_index = ends if decode_only and samples.all() else samples.nonzero()[0]
        pending = np.fromiter(map(_pending, scheduled), dtype=np.int64, count=n)
        pending_index = pending.nonzero()[0] if pending.any() else _NONE
        if pending_index.size and int(pending[pending_index].max()) != 1:
            raise RuntimeError("a request can wait for at most one token from the previous step")
        padding = pad_lens.tolist()
        query_lens_cpu = q_lens.tolist() + padding
        seq_lens_cpu = seq_lens.tolist() + padding
        return cls(
            scheduled=scheduled,
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            num_scheduled_tokens=num_real,
            token_ids=ids,
            positions=pos,
            slot_mapping=slots,
            query_start_loc=qsl,
            seq_lens=sl,
            block_table=table,
            slot_mappings=group_slots,
            block_tables=group_tables,
            block_size=bs,
            query_lens_cpu=query_lens_cpu,
            seq_lens_cpu=seq_lens_cpu,
            max_query_len=1 if decode_only and pad_tokens_to is None else max(query_lens_cpu),
            max_seq_len=max(seq_lens_cpu),
            sample_index=sample_index,
            logits_indices=ends if sample_index is ends else ends[sample_index],
            pending_rows=ends[pending_index] if pending_index.size else _NONE,
            pending_request_ids=(
                list(map(_request_id, scheduled))
                if pending_index.shape[0] == n  # every request waits (the steady async decode)
                else [scheduled[i].request_id for i in pending_index.tolist()]
            ),
            prompt_rows=prompt_logprob_rows(scheduled),
            buffers=buffers,
            padded_to=pad_to,
        )
