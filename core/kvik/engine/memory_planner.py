"""Decides how many KV blocks fit, and whether max_model_len fits in them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kvik.scheduling.kv_cache_manager import blocks_held_at_most, longest_fitting_request

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass(slots=True)
class MemoryPlan:
    num_blocks: int
    block_size: int
    block_bytes: int
    weight_bytes: int
    activation_bytes: int
    kv_bytes: int
    max_model_len: int
    # The most blocks one request holds at once: its whole length in every KV-cache group, less in groups
    # whose layers slide.
    blocks_per_request: int
    # Per KV-cache group, its layers' window (kvik.scheduling.kv_cache_groups).
    group_windows: tuple[int | None, ...] = (None,)

    @property
    def kv_tokens(self) -> int:
        """Tokens of K/V the pool holds at once: each position of a long request costs one block per group
        whose layers see the whole context (a window's groups hold a bounded number on top)."""
        return self.num_blocks * self.block_size // max(1, sum(w is None for w in self.group_windows))

    @property
    def max_concurrent_full_length(self) -> int:
        """How many max_model_len-long requests fit in the cache at once."""
        return (self.num_blocks - 1) // self.blocks_per_request

    def summary(self) -> str:
        return (
            f"weights {self.weight_bytes / GiB:.2f} GiB, activations {self.activation_bytes / GiB:.2f} GiB, "
            f"KV cache {self.kv_bytes / GiB:.2f} GiB = {self.num_blocks} blocks x {self.block_size} tokens "
            f"({self.kv_tokens} tokens); max_model_len {self.max_model_len}: "
            f"{self.max_concurrent_full_length} concurrent full-length requests"
        )


def plan_memory(
    *,
    total_bytes: int,
    free_bytes: int,
    utilization: float,
    weight_bytes: int,
    activation_bytes: int,
    block_bytes: int,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    auto_max_model_len: bool,
    kv_cache_memory: int = 0,
    num_blocks: int = 0,
    group_windows: Sequence[int | None] = (None,),
    step_tokens: int = 0,
) -> MemoryPlan:
    """Size the KV pool and check ``max_model_len`` against it.

    Precedence: an explicit ``num_blocks``, then ``kv_cache_memory`` bytes (0: not fixed),
    then ``utilization`` of the device's total memory minus weights and
    activations (and never more than is free now). The pool is capped at what
    ``max_num_seqs`` full-length requests could ever use, so small models do not
    reserve memory they cannot touch. ``group_windows``: per KV-cache group, the window its layers slide with
    (None: the whole context; ``block_bytes`` is then one block id's pages in the groups' shared tensors). In
    a group that slides, a request holds only the window's blocks and a step's (``step_tokens``) at once, so
    ``max_model_len`` may exceed the pool.
    """
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    if num_blocks:
        budget = num_blocks * block_bytes
        source = "num_kv_blocks"
    elif kv_cache_memory:
        budget = kv_cache_memory
        source = "kv_cache_memory"
    else:
        budget = min(int(total_bytes * utilization) - weight_bytes - activation_bytes, free_bytes - activation_bytes)
        source = f"gpu_memory_utilization={utilization}"
        if budget < block_bytes:
            raise ValueError(
                f"no memory left for the KV cache: {total_bytes / GiB:.2f} GiB x {utilization} leaves "
                f"{budget / GiB:.2f} GiB after weights ({weight_bytes / GiB:.2f} GiB) and activations "
                f"({activation_bytes / GiB:.2f} GiB); raise gpu_memory_utilization, lower max_num_batched_tokens, "
                "or set kv_cache_memory explicitly"
            )
    blocks = num_blocks or budget // block_bytes
    group_windows = tuple(group_windows)
    blocks_per_seq = blocks_held_at_most(max_model_len, block_size, group_windows, step_tokens)
    if not num_blocks:
        blocks = min(blocks, max_num_seqs * blocks_per_seq + 1)
    if blocks < 2:
        raise ValueError(
            f"{source} gives {budget} bytes, less than two KV blocks of {block_bytes} bytes; "
            "give the KV cache more memory"
        )
    if blocks_per_seq > blocks - 1:
        fitting = longest_fitting_request(blocks - 1, block_size, group_windows, step_tokens, max_model_len)
        if auto_max_model_len:
            logger.warning(
                "max_model_len lowered from %d to %d to fit the KV cache (%s)", max_model_len, fitting, source
            )
            max_model_len = fitting
            blocks_per_seq = blocks_held_at_most(max_model_len, block_size, group_windows, step_tokens)
        else:
            short = (blocks_per_seq + 1 - blocks) * block_bytes
            windows = sorted({w for w in group_windows if w is not None})
            needs = f"needs {blocks_per_seq} KV blocks" if not windows else (
                f"needs {blocks_per_seq} KV blocks per request (its {'/'.join(map(str, windows))}-token sliding "
                f"window and a step's {step_tokens} tokens"
                + (f", in {len(group_windows)} KV-cache groups)" if len(group_windows) > 1 else ")")
            )
            raise ValueError(
                f"max_model_len {max_model_len} {needs} but only {blocks - 1} fit "
                f"({source}; short by {short / GiB:.3f} GiB). The largest max_model_len that fits is {fitting}: "
                f"pass max_model_len={fitting} (or 'auto'), or give the KV cache more memory"
            )
    plan = MemoryPlan(
        num_blocks=blocks,
        block_size=block_size,
        block_bytes=block_bytes,
        weight_bytes=weight_bytes,
        activation_bytes=activation_bytes,
        kv_bytes=blocks * block_bytes,
        max_model_len=max_model_len,
        blocks_per_request=blocks_per_seq,
        group_windows=group_windows,
    )
    logger.info("memory plan: %s", plan.summary())
    return plan
