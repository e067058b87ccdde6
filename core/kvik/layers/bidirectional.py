"""Bidirectional (encoder) attention over a step's flattened requests, without a KV cache.

An encoder request is computed in one step (chunked prefill and prefix caching
are off for encoder models, see :func:`kvik.engine.config_resolution.resolve_config`),
so every token's keys are in the step: the flat ``[T, ...]`` rows are scattered
into a padded ``[B, L, ...]`` batch once per step, attention runs through
``scaled_dot_product_attention`` with a key-padding mask (and, for local-attention
layers, a band of ``|i - j| <= window``), and the rows are gathered back. When
every request has the same length nothing is padded or masked.

A model calls :class:`EncoderAttention` with the packed q | k | v rows and the
step's metadata, never with host data of its own: the step's
:class:`SequenceBatch` is built on the first call and kept in the metadata for
the other layers. So everything between two attention calls reads only device
tensors of fixed shape, and a runner can replay it as a CUDA graph
(``kvik_cuda.piecewise`` cuts the forward at these calls, as it cuts a decoder's
at its paged attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kvik.attention.backend import AttentionMetadata
from kvik.tensor_transfer import to_device

_KEY = "sequence_batch"  # where a step's SequenceBatch is kept in AttentionMetadata.backend_data


@dataclass(slots=True)
class SequenceBatch:
    """Where each request's rows sit in the padded batch (shared by every layer of a step)."""

    lens: list[int]  # tokens of each request
    max_len: int  # L
    num_rows: int  # T: rows of the flat step, padding after the requests' tokens included
    dest: torch.Tensor | None  # [sum(lens)] int64 row in the padded [B * L] batch; None: no padding
    key_mask: torch.Tensor | None  # [B, 1, 1, L] bool, True for a real key; None: no padding

    @classmethod
    def of_step(cls, metadata: AttentionMetadata[torch.Tensor], num_rows: int, device: torch.device) -> SequenceBatch:
        """The step's batch, built on the first call and kept in ``metadata.backend_data`` for the next ones."""
        found = metadata.backend_data.get(_KEY)
        if not isinstance(found, SequenceBatch) or found.num_rows != num_rows:
            found = metadata.backend_data[_KEY] = cls.from_metadata(metadata, num_rows, device)
        return found

    @classmethod
    def from_metadata(cls, metadata: AttentionMetadata[torch.Tensor], num_rows: int, device: torch.device) -> SequenceBatch:
        """The batch of the step's real requests (a runner's padding requests attend to nothing: their rows,
        after the real ones, come out zero)."""
        n = metadata.num_reqs - metadata.num_padding_reqs
        lens = [int(x) for x in metadata.query_lens_cpu[:n]]
        if [int(x) for x in metadata.seq_lens_cpu[:n]] != lens:
            raise RuntimeError(
                "an encoder (bidirectional) model got a request split over steps; it must see whole prompts "
                "(chunked prefill and prefix caching off)"
            )
        max_len = max(lens)
        if all(n_ == max_len for n_ in lens):  # [B, L] is the real rows as they lie
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

    def _mask(self, window: int | None, device: torch.device) -> torch.Tensor | None:
        """The boolean mask for SDPA: key padding [B, 1, 1, L], and/or a band [1, 1, L, L] (True: attend)."""
        if window is None or window >= self.max_len - 1:  # the band covers every pair
            return self.key_mask
        pos = torch.arange(self.max_len, device=device)
        band = ((pos[:, None] - pos[None, :]).abs() <= window)[None, None]
        return band if self.key_mask is None else band & self.key_mask

    def attend(
        self,
        qkv: torch.Tensor,
        num_heads: int,
        head_dim: int,
        scale: float,
        window: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """qkv [T, 3 * H * D] (q | k | v) -> attention output [T, H * D], each request attending to itself
        (with ``window``: only to keys at most that many positions away, either side); written into ``out``
        when given (its padding rows zeroed)."""
        b, L, width = len(self.lens), self.max_len, num_heads * head_dim
        real = qkv[: self.num_real]
        if self.dest is None:
            padded = real
        else:
            padded = real.new_zeros(b * L, 3 * width).index_copy_(0, self.dest, real)
        q, k, v = padded.view(b, L, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, L, D]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(window, qkv.device), scale=scale)
        rows = attended.transpose(1, 2).reshape(b * L, width)
        if self.dest is not None:
            rows = rows.index_select(0, self.dest)
        if out is None:
            if rows.shape[0] == self.num_rows:
                return rows
            out = rows.new_empty(self.num_rows, width)
        out[: rows.shape[0]] = rows
        out[rows.shape[0] :] = 0  # rows padding the step (never read)
        return out


class EncoderAttention(nn.Module):
    """One layer's bidirectional attention: ``forward(qkv, metadata)`` with qkv [T, 3 * H * D] (q | k | v)
    -> [T, H * D]. Its only per-step input is the metadata (a runner's piecewise graphs replace this
    call by an eager one on the replayed step's metadata, see the module docstring)."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.window = num_heads, head_dim, scale, window

    def forward(self, qkv: torch.Tensor, metadata: AttentionMetadata[torch.Tensor]) -> torch.Tensor:
        return self.attend(qkv, metadata)

    def packed_rows(self, like: torch.Tensor) -> torch.Tensor | None:
        """Where the model should write this layer's ``[T, 3 * H * D]`` q | k | v rows (``like``: a tensor
        with the step's rows, dtype and device), or None: wherever it likes.

        Eager steps say None. A runner capturing piecewise graphs points it at the static buffer that
        the replayed attention call reads, so the replay writes the rows there instead of copying them
        there (a copy of the whole q | k | v per layer: 6% of BERT-base's kernel time on an H200, run m1).
        """
        return None

    def project(self, x: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        """``proj(x)``, the packed q | k | v rows, written where :meth:`packed_rows` says."""
        out = self.packed_rows(x)
        if out is None:
            return proj(x)  # type: ignore[no-any-return]
        if type(proj) is nn.Linear:  # F.linear's own GEMM (addmm with the bias), into ``out``
            if proj.bias is None:
                return torch.mm(x, proj.weight.t(), out=out)
            return torch.addmm(proj.bias, x, proj.weight.t(), out=out)
        return out.copy_(proj(x))

    def attend(
        self, qkv: torch.Tensor, metadata: AttentionMetadata[torch.Tensor], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The attention output (into ``out`` when given, [T, H * D])."""
        batch = SequenceBatch.of_step(metadata, qkv.shape[0], qkv.device)
        return batch.attend(qkv, self.num_heads, self.head_dim, self.scale, self.window, out)
