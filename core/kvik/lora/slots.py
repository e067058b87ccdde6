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
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from kvik.lora.adapter import AdapterInfo, check_adapter
from kvik.lora.host import HostAdapter, read_host_adapter
from kvik.lora.layers import WrappedModel, write_slot
from kvik.lora.request import LoRARequest
from kvik.scheduling.output import ScheduledRequest

logger = logging.getLogger(__name__)

READ_THREADS = 4  # background adapter reads at once (at most one per CPU core)


class LoRASlots:
    """The slot table and host cache of one runner."""

    def __init__(self, wrapped: WrappedModel, max_loras: int, max_cpu_loras: int, max_rank: int) -> None:
        self.wrapped = wrapped
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_rank = max_rank
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self.cpu: OrderedDict[int, HostAdapter] = OrderedDict()  # adapter id -> host weights, LRU first
        self.num_loads = 0  # slot fills (for tests and logs)
        self.num_disk_reads = 0
        self.num_prefetched = 0  # disk reads that ran ahead of the step, off its thread
        # Seconds the engine's thread spent bringing adapters into slots (benchmarks): all of it, the
        # part waiting for a background read to finish, and the part reading from disk itself.
        self.step_load_s = 0.0
        self.step_wait_s = 0.0
        self.step_read_s = 0.0
        # Host copies being read in the background (prefetch): adapter id -> (path, its read).
        self._reading: dict[int, tuple[str, Future[HostAdapter]]] = {}
        self._lock = threading.Lock()  # prefetch runs on request-admission threads
        self._pool: ThreadPoolExecutor | None = None

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """PEFT module path -> (in, out) of every projection an adapter may target."""
        return {name: (t.in_features, t.out_features) for name, t in self.wrapped.targets.items()}

    def check(self, path: str) -> AdapterInfo:
        return check_adapter(path, self.max_rank, self.target_shapes())

    def remove(self, lora_int_id: int) -> None:
        """Forget an adapter (unloaded): its slot and host copy are freed."""
        with self._lock:
            self._reading.pop(lora_int_id, None)
            self.cpu.pop(lora_int_id, None)
        self.slot_of.pop(lora_int_id, None)

    def prefetch(self, request: LoRARequest) -> None:
        """Start reading ``request``'s adapter into host memory on a background thread (at admission), unless
        it is there or being read. A full host cache gives up its least recently used copy (a slot keeps
        its own weights; the copy only serves a later refill); with ``max_cpu_loras`` reads already in
        flight the step reads it, as before.

        An 8B rank-16 adapter is ~84 MB to read and page-lock; read at the step that first
        needs it, that time stalled every running request (64 adapters: most of a 14 s run on the H200).
        """
        lora_id = request.lora_int_id
        with self._lock:
            if lora_id in self.cpu or lora_id in self._reading or len(self._reading) >= self.max_cpu_loras:
                return
            while self.cpu and len(self.cpu) + len(self._reading) >= self.max_cpu_loras:
                self.cpu.popitem(last=False)
            if self._pool is None:
                # A read is mostly readinto and one multiply, both outside the GIL: a few run side by side.
                workers = min(READ_THREADS, os.cpu_count() or 1)
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvik-lora-read")
            self._reading[lora_id] = (request.lora_path, self._pool.submit(self._read, request.lora_path))

    def loading(self, lora_int_id: int) -> bool:
        """True while the adapter's background read (prefetch) is still running."""
        reading = self._reading.get(lora_int_id)  # one dict read: safe against the admission threads
        return reading is not None and not reading[1].done()

    def _read(self, path: str) -> HostAdapter:
        sample = self.wrapped.layers[0].lora_a
        return read_host_adapter(self.check(path), self.wrapped, sample.dtype, pin=sample.device.type == "cuda")

    def _host_weights(self, request: LoRARequest) -> HostAdapter:
        lora_id = request.lora_int_id
        with self._lock:  # admission threads evict from the host cache (prefetch)
            loaded = self.cpu.get(lora_id)
            if loaded is not None and loaded.info.path == request.lora_path:
                self.cpu.move_to_end(lora_id)
                return loaded
            reading = self._reading.pop(lora_id, None)
        loaded = None
        if reading is not None and reading[0] == request.lora_path:
            start = time.perf_counter()
            try:
                loaded = reading[1].result()
                self.num_prefetched += 1
            except Exception:  # read again below, where the error reaches the step
                loaded = None
            self.step_wait_s += time.perf_counter() - start
        if loaded is None:
            start = time.perf_counter()
            loaded = self._read(request.lora_path)
            self.step_read_s += time.perf_counter() - start
        self.num_disk_reads += 1
        with self._lock:
            self.cpu[lora_id] = loaded
            self.cpu.move_to_end(lora_id)
            while len(self.cpu) > self.max_cpu_loras:
                self.cpu.popitem(last=False)
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
            start = time.perf_counter()
            write_slot(self.wrapped, slot, self._host_weights(request))
            self.step_load_s += time.perf_counter() - start
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

