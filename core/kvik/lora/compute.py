"""The batched LoRA delta: every row of a projection's input under its own adapter slot.

For one projection with ``S`` output shards (q/k/v fused: 3, gate/up: 2, else 1)
and slot weights

    a: [L, S * R, in]    each slot's A of every shard, shard k at rows [k*R, k*R + r)
    b: [L, out, R]       each slot's B (scaling folded in), rows in output order

row ``t`` under slot ``s = slots[t]`` (``-1``: no adapter) gets

    shrink = x[t] @ a[s].T                         [S * R]   (the Punica "shrink")
    y[t, j] += shrink[k(j)*R : (k(j)+1)*R] @ b[s, j]          (the "expand"; k(j): j's shard)

so a whole batch mixing adapters and base rows is one shrink and one expand per
projection. This module holds the torch reference (any device; a loop over the
slots present, which reads them on the host); the CUDA platform's Triton kernels
(``kvik_cuda.lora_kernels``) compute the same thing with per-token slot indices
on the device, so they stay valid inside CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# add_lora(y, x, a, b, slots, shard_starts): y += the delta, in place.
AddLoRA = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]], None]
# project(x, a, b, slots, shard_starts, base): base(x) plus the delta, computed however the platform likes
# (the CUDA one overlaps the shrink with the base matmul); the result must equal base(x), then add_lora.
ProjectLoRA = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]],
    torch.Tensor,
]


def add_lora_reference(
    y: torch.Tensor,  # [T, out] the base projection's output, updated in place
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [L, S * R, in]
    b: torch.Tensor,  # [L, out, R]
    slots: torch.Tensor,  # [T] int64, -1 = no adapter
    shard_starts: tuple[int, ...],  # [S] first output column of each shard (starts with 0)
) -> None:
    """Segmented reference: for each slot present, shrink and expand its rows in float32."""
    rank = b.shape[2]
    out = y.shape[1]
    ends = (*shard_starts[1:], out)
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        rows = (slots == slot).nonzero().squeeze(1)
        shrink = x.index_select(0, rows).float() @ a[slot].float().T  # [n, S * R]
        delta = torch.empty((rows.shape[0], out), dtype=torch.float32, device=y.device)
        for k, (start, end) in enumerate(zip(shard_starts, ends, strict=True)):
            delta[:, start:end] = shrink[:, k * rank : (k + 1) * rank] @ b[slot, start:end].float().T
        # Rows are distinct: a gather, an add in y's dtype and a scatter (index_add_ is ~100x slower on CPU).
        y.index_copy_(0, rows, y.index_select(0, rows) + delta.to(y.dtype))
