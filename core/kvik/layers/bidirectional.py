"""Bidirectional (encoder) attention over a step's flattened requests, without a KV cache.

An encoder request is computed in one step (chunked prefill and prefix caching
are off for encoder models, see :func:`kvik.engine.config_resolution.resolve_config`),
so every token's keys are in the step: the flat ``[T, ...]`` rows are scattered
into a padded ``[B, L, ...]`` batch once per step, attention runs through
``scaled_dot_product_attention`` with a key-padding mask (and, for local-attention
layers, a band of ``|i - j| <= window``), and the rows are gathered back. When
every request has the same length nothing is padded or masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kvik.attention.backend import AttentionMetadata
from kvik.tensor_transfer import to_device


@dataclass(slots=True)
class SequenceBatch:
    """Where each request's rows sit in the padded batch (shared by every layer of a step)."""

    lens: list[int]  # tokens of each request
    max_len: int  # L
    num_rows: int  # T: rows of the flat step, padding after the requests' tokens included
    dest: torch.Tensor | None  # [sum(lens)] int64 row in the padded [B * L] batch; None: no padding
    key_mask: torch.Tensor | None  # [B, 1, 1, L] bool, True for a real key; None: no padding

    @classmethod
    def from_metadata(cls, metadata: AttentionMetadata[torch.Tensor], num_rows: int, device: torch.device) -> SequenceBatch:
        n = metadata.num_reqs
        lens = [int(x) for x in metadata.query_lens_cpu[:n]]
        if [int(x) for x in metadata.seq_lens_cpu[:n]] != lens:
            raise RuntimeError(
                "an encoder (bidirectional) model got a request split over steps; it must see whole prompts "
                "(chunked prefill and prefix caching off)"
            )
        max_len = max(lens)
        if all(n_ == max_len for n_ in lens) and num_rows == sum(lens):
            return cls(lens, max_len, num_rows, None, None)
        starts = np.arange(len(lens), dtype=np.int64) * max_len
        dest = np.concatenate([np.arange(n_, dtype=np.int64) + s for n_, s in zip(lens, starts, strict=True)])
        mask = np.arange(max_len)[None, :] < np.array(lens)[:, None]  # [B, L]
        return cls(
            lens,
            max_len,
            num_rows,
            to_device(torch.from_numpy(dest), device),  # pinned: a pageable copy would wait for the device
            to_device(torch.from_numpy(mask), device)[:, None, None, :],
        )

    @property
    def num_real(self) -> int:
        return sum(self.lens)

    def segment_ids(self, device: torch.device) -> torch.Tensor:
        """[sum(lens)] int64: the request each real row belongs to."""
        ids = np.repeat(np.arange(len(self.lens), dtype=np.int64), self.lens)
        return to_device(torch.from_numpy(ids), device)

    def _mask(self, window: int | None, device: torch.device) -> torch.Tensor | None:
        """The boolean mask for SDPA: key padding [B, 1, 1, L], and/or a band [1, 1, L, L] (True: attend)."""
        if window is None or window >= self.max_len - 1:  # the band covers every pair
            return self.key_mask
        pos = torch.arange(self.max_len, device=device)
        band = ((pos[:, None] - pos[None, :]).abs() <= window)[None, None]
        return band if self.key_mask is None else band & self.key_mask

    def attend(
        self, qkv: torch.Tensor, num_heads: int, head_dim: int, scale: float, window: int | None = None
    ) -> torch.Tensor:
        """qkv [T, 3 * H * D] (q | k | v) -> attention output [T, H * D], each request attending to itself
        (with ``window``: only to keys at most that many positions away, either side)."""
        b, L, width = len(self.lens), self.max_len, num_heads * head_dim
        real = qkv[: self.num_real]
        if self.dest is None:
            padded = real
        else:
            padded = real.new_zeros(b * L, 3 * width).index_copy_(0, self.dest, real)
        q, k, v = padded.view(b, L, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(window, qkv.device), scale=scale)
        out = out.transpose(1, 2).reshape(b * L, width)
        if self.dest is not None:
            out = out.index_select(0, self.dest)
        if out.shape[0] < self.num_rows:  # rows padding the step (never read) stay zero
            out = torch.cat([out, out.new_zeros(self.num_rows - out.shape[0], width)])
        return out
