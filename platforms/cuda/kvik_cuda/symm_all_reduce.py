"""The tensor-parallel all-reduce for decode-sized inputs: torch's symmetric memory over NVLink.

A decode step of a 32-layer model sums two small activations per layer over the group
(``[batch, hidden]``, kilobytes to a few megabytes). NCCL's all-reduce costs 13-21 µs
each on two H200s (its protocol's handshakes dominate at that size: 0.85-1.35 ms of a
3.5 ms TP=2 step, measured with ``benchmarks/tp_benchmark.py``). Symmetric memory maps
each rank's buffer into its peers' address space once, at start; then one kernel per
sum reads every rank's buffer directly (one-shot: each rank adds all the buffers itself,
in rank order, so every rank gets the same bits). It needs P2P access between the
devices, not NVLink multicast (which this platform never turns on).

Inputs above :data:`MAX_BYTES`, of another dtype than the buffer's, or on a group whose
rendezvous failed go to NCCL (the contract of ``Platform.tensor_parallel_all_reduce``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Above this, one-shot reads (world - 1) whole peer buffers per rank and NCCL's ring wins. 2 MiB holds a
# [256, 4096] bf16 activation (a full decode batch of an 8B model) and [128, 8192] (70B).
MAX_BYTES = 2 << 20


class SymmetricMemoryAllReduce:
    """Sums inputs of up to ``max_bytes`` over ``group`` through one symmetric buffer (see the module doc)."""

    def __init__(self, group: Any, dtype: torch.dtype, device: torch.device, max_bytes: int = MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name: str = group.group_name
        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # torch < 2.8 wants the group registered first
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        n = x.numel()
        if x.dtype != self.dtype or n > self.max_numel or n == 0:
            return None
        staged = self.buffer[:n]
        staged.copy_(x.reshape(-1))
        summed: torch.Tensor = torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name)
        return summed.view(x.shape)


def symmetric_all_reduce(group: Any, dtype: torch.dtype, device: torch.device) -> SymmetricMemoryAllReduce | None:
    """The all-reduce for ``group``, or None (with one log line saying why) where symmetric memory cannot
    be set up: an older torch, no P2P between the devices, a dtype it cannot sum."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    try:
        return SymmetricMemoryAllReduce(group, dtype, device)
    except Exception as exc:  # any setup failure leaves NCCL doing every sum, which is always correct
        logger.info("symmetric-memory all-reduce unavailable (%s: %s); tensor parallelism sums through NCCL",
                    type(exc).__name__, str(exc).splitlines()[0][:200])  # fmt: skip
        return None
