"""Keeping adapters in the device slots: LRU over ``max_loras`` slots, fed from a host cache.

Each step, the runner calls :meth:`LoRASlots.token_slots` with the scheduled
requests: every adapter the step needs gets a slot (already there, or copied in
over the least recently used slot this step does not need), its weights taken
from the host cache (``max_cpu_loras`` adapters, LRU) or read from disk. The
scheduler never puts more than ``max_loras`` adapters in one step, so a slot is
always free. The result is each token row's slot index (``-1`` for base-model
rows), which the runner copies into :attr:`LoRAState.token_slots`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from kvik.lora.adapter import AdapterInfo, LoadedAdapter, check_adapter, load_adapter
from kvik.lora.layers import WrappedModel, write_slot
from kvik.lora.request import LoRARequest
from kvik.scheduling.output import ScheduledRequest

logger = logging.getLogger(__name__)


class LoRASlots:
    """The slot table and host cache of one runner."""

    def __init__(self, wrapped: WrappedModel, max_loras: int, max_cpu_loras: int, max_rank: int) -> None:
        self.wrapped = wrapped
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_rank = max_rank
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self.cpu: OrderedDict[int, LoadedAdapter] = OrderedDict()  # adapter id -> host weights, LRU first
        self.num_loads = 0  # slot fills (for tests and logs)
        self.num_disk_reads = 0

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """PEFT module path -> (in, out) of every projection an adapter may target."""
        return {name: (t.in_features, t.out_features) for name, t in self.wrapped.targets.items()}

    def check(self, path: str) -> AdapterInfo:
        return check_adapter(path, self.max_rank, self.target_shapes())

    def remove(self, lora_int_id: int) -> None:
        """Forget an adapter (unloaded): its slot and host copy are freed."""
        self.cpu.pop(lora_int_id, None)
        self.slot_of.pop(lora_int_id, None)

    def _host_weights(self, request: LoRARequest) -> LoadedAdapter:
        loaded = self.cpu.get(request.lora_int_id)
        if loaded is None or loaded.info.path != request.lora_path:
            sample = self.wrapped.layers[0].lora_a
            loaded = _packed(load_adapter(self.check(request.lora_path), sample.dtype), pin=sample.device.type == "cuda")
            self.num_disk_reads += 1
            self.cpu[request.lora_int_id] = loaded
            while len(self.cpu) > self.max_cpu_loras:
                self.cpu.popitem(last=False)
        self.cpu.move_to_end(request.lora_int_id)
        return loaded

    def assign(self, requests: list[LoRARequest]) -> dict[int, int]:
        """Make sure each adapter of ``requests`` (distinct ids) holds a slot; adapter id -> slot."""
        if len(requests) > self.max_loras:
            raise RuntimeError(
                f"a step needs {len(requests)} adapters but there are only max_loras={self.max_loras} slots"
            )
        needed = {r.lora_int_id for r in requests}
        for request in requests:
            lora_id = request.lora_int_id
            if lora_id in self.slot_of:
                self.slot_of.move_to_end(lora_id)
                continue
            used = set(self.slot_of.values())
            free = [s for s in range(self.max_loras) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(i for i in self.slot_of if i not in needed)
                slot = self.slot_of.pop(victim)
            weights = self._host_weights(request)
            write_slot(self.wrapped, slot, {m: (a, b) for m, (a, b) in weights.weights.items()})
            self.slot_of[lora_id] = slot
            self.num_loads += 1
            logger.debug("LoRA adapter %s (id %d) -> slot %d", request.lora_name, lora_id, slot)
        return {i: self.slot_of[i] for i in needed}

    def token_slots(self, scheduled: list[ScheduledRequest], num_tokens: int) -> np.ndarray | None:
        """[num_tokens] int64 slot per token row (padding rows -1), or None when no row has an adapter."""
        distinct: dict[int, LoRARequest] = {}
        for sched in scheduled:
            if sched.lora_request is not None:
                distinct.setdefault(sched.lora_request.lora_int_id, sched.lora_request)
        if not distinct:
            return None
        slot_of = self.assign(list(distinct.values()))
        per_request = np.fromiter(
            (-1 if s.lora_request is None else slot_of[s.lora_request.lora_int_id] for s in scheduled),
            dtype=np.int64,
            count=len(scheduled),
        )
        counts = np.fromiter((len(s.token_ids) for s in scheduled), dtype=np.int64, count=len(scheduled))
        out = np.full(num_tokens, -1, dtype=np.int64)
        out[: int(counts.sum())] = np.repeat(per_request, counts)
        return out


def _packed(loaded: LoadedAdapter, pin: bool) -> LoadedAdapter:
    """The adapter's tensors as views of one host buffer, page-locked when the slots are on a GPU.

    Page-locked, slot swaps are asynchronous copies that do not wait for the step in flight; one
    buffer per adapter is one pinning call where per-tensor pinning made 448 (rank-16 8B adapter).
    """
    import torch

    tensors = [t for pair in loaded.weights.values() for t in pair]
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, pin_memory=pin)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for module, pair in loaded.weights.items():
        views = []
        for t in pair:
            view = flat[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            views.append(view)
            offset += t.numel()
        weights[module] = (views[0], views[1])
    return LoadedAdapter(loaded.info, weights)
