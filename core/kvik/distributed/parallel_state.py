"""This process's place in the tensor x pipeline layout, and the collectives the layers call.

Global ranks are laid out pipeline-major: ``rank = pp_rank * tp_size + tp_rank``, so the
ranks of one pipeline stage (one tensor-parallel group) are adjacent, which on one host
puts them on neighbouring GPUs. The state is process-global (set once by the worker
before the model is built), like ``torch.distributed``'s own default group; a process
that never sets it is a single device and every collective here is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# A platform's faster sum over the tensor-parallel group (Platform.tensor_parallel_all_reduce): the sum as a
# new tensor, or None for an input it does not take.
AllReduce = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(slots=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None  # torch.distributed ProcessGroup of this stage's ranks (None: tp_size 1)
    fast_all_reduce: AllReduce | None = None  # the platform's, tried before torch.distributed's

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """The decoder layers ``[start, end)`` this stage runs: an even split, the remainder to the
        first stages (they also hold the embedding, the last holds the head: roughly balanced)."""
        return stage_layers(num_layers, self.pp_size, self.pp_rank)

    # -- collectives (identity on one device) ----------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the tensor-parallel group: the platform's all-reduce where it takes ``x``
        (a new tensor), else torch.distributed's (``x`` summed in place)."""
        if self.tp_size > 1:
            if self.fast_all_reduce is not None:
                summed = self.fast_all_reduce(x)
                if summed is not None:
                    return summed
            import torch.distributed as dist

            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each tensor-parallel rank's ``x`` along the last dim, in rank order."""
        if self.tp_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def send_next(self, tensors: list[torch.Tensor]) -> None:
        """Send activations to the same tensor-parallel rank of the next pipeline stage."""
        import torch.distributed as dist

        peer = self.rank + self.tp_size
        for t in tensors:
            dist.send(t.contiguous(), dst=peer)

    def recv_prev(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """Receive the previous stage's activations (``shapes`` in the order they were sent)."""
        import torch.distributed as dist

        peer = self.rank - self.tp_size
        out = []
        for shape in shapes:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(t, src=peer)
            out.append(t)
        return out


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """Layers ``[start, end)`` of stage ``pp_rank`` when ``num_layers`` are split over ``pp_size`` stages."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    """This process's parallel state (a single device unless a worker set one)."""
    return _STATE


def set_parallel_state(state: ParallelState) -> ParallelState:
    """Install ``state`` for this process; returns the previous one (tests restore it)."""
    global _STATE
    previous, _STATE = _STATE, state
    return previous


def init_parallel_state(tp_size: int, pp_size: int, rank: int) -> ParallelState:
    """After ``torch.distributed.init_process_group``: build the tensor-parallel groups (every rank
    creates every group, in the same order, as ``new_group`` requires) and install the state."""
    import torch.distributed as dist

    tp_group = None
    for stage in range(pp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if rank in ranks:
            tp_group = group
    state = ParallelState(rank % tp_size, tp_size, rank // tp_size, pp_size, tp_group)
    set_parallel_state(state)
    return state
