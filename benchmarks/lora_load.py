"""What an adapter's first use costs the engine loop: the 8B shape's adapter path without the model.

    PYTHONPATH=core python3 benchmarks/lora_load.py                # the 8B shape (hidden 4096, 32 layers), rank 16
    PYTHONPATH=core python3 benchmarks/lora_load.py --layers 2     # a quick run (the per-layer costs scale)
    PYTHONPATH=core python3 benchmarks/lora_load.py --device cuda  # slots on the GPU (pinned host copies);
                                                                   # also a part of lora_throughput.py

The base layers are built on the meta device (no 16 GB of weights); only the adapter slots
(``max_loras`` of them, ~84 MB each for rank 16) are real, so the adapter path runs at its true
size: :class:`kvik.lora.slots.LoRASlots` reads random PEFT adapters (written like
``benchmarks/lora_throughput.py`` writes them, bf16) and fills slots as an engine step does.
It times, per adapter:

- ``read_ms``: the host read (``prefetch``: on a background thread from admission);
- ``step_fill_ms``: the step's :meth:`LoRASlots.token_slots` for a step that brings in an adapter
  whose prefetch has finished (what the engine loop pays on its thread);
- ``step_cold_ms``: the same for an adapter nobody prefetched (read on the step);
- ``step_ops``: the torch calls the step's slot fill makes (each is a launch on a GPU);
- on a GPU, ``step_fill_sync_ms``: ``step_fill_ms`` plus waiting for its copies to land;
- ``loop_stall_ms``: the longest gap between tiny device ops that the main thread (the engine loop)
  issues back to back while a background read runs (the GIL, or a driver lock taken by page-locking),
  next to ``loop_stall_idle_ms``, the same without a read;
- ``pin_alloc_ms``: allocating one adapter's page-locked host buffer (GPU only).

Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _model(layers: int, hidden: int, heads: int, kv_heads: int, inter: int) -> Any:
    """An 8B-shaped Llama's projections (kvik's fused qkv / gate_up) on the meta device."""
    import torch
    from kvik.layers.linear import Linear
    from torch import nn

    hd = hidden // heads

    def layer() -> nn.Module:
        m = nn.Module()
        m.self_attn, m.mlp = nn.Module(), nn.Module()
        kw: dict[str, Any] = {"dtype": torch.bfloat16, "device": "meta"}
        m.self_attn.qkv_proj = Linear(hidden, [heads * hd, kv_heads * hd, kv_heads * hd], **kw)
        m.self_attn.o_proj = Linear(heads * hd, hidden, **kw)
        m.mlp.gate_up_proj = Linear(hidden, [inter, inter], **kw)
        m.mlp.down_proj = Linear(inter, hidden, **kw)
        return m

    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([layer() for _ in range(layers)])
    return root


def _count_ops(fn: Any) -> int:
    """Torch calls ``fn`` makes (a GPU launches one kernel or copy for each)."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if getattr(func, "__name__", "") in ("copy_", "zero_", "fill_", "mul_"):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def measure(layers: int, rank: int, adapters: int, max_loras: int, device: str, root: Path) -> dict[str, Any]:
    """Read ``adapters`` prefetched and ``adapters`` cold adapters into slots; the median costs (ms)."""
    import torch
    from kvik.lora.layers import wrap_model
    from kvik.lora.request import LoRARequest
    from kvik.lora.slots import LoRASlots
    from kvik.sampling_params import SamplingParams
    from kvik.scheduling.output import ScheduledRequest
    from kvik.testing.tiny_lora import write_random_adapter

    cfg = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                          num_hidden_layers=layers)  # fmt: skip
    paths = []
    for i in range(adapters * 2):  # half prefetched, half cold; distinct files
        path = root / f"l{layers}r{rank}" / f"a{i}"
        if not (path / "adapter_model.safetensors").exists():
            write_random_adapter(path, cfg, rank=rank, seed=i)
        paths.append(str(path))
    model = _model(layers, 4096, 32, 8, 14336)
    wrapped = wrap_model(model, max_loras, rank, 64, device=torch.device(device), dtype=torch.bfloat16)
    slots = LoRASlots(wrapped, max_loras, adapters * 4, rank)  # room for all: every prefetch runs
    for path in paths:  # warm the page cache (the throughput benchmark reads one adapter file, cached)
        Path(path, "adapter_model.safetensors").read_bytes()
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(request: LoRARequest) -> tuple[float, float]:
        sched = ScheduledRequest("r", [1], 0, [0], False, SamplingParams(), lora_request=request)
        sync()
        start = time.perf_counter()
        slots.token_slots([sched], 1)
        host = time.perf_counter() - start
        sync()
        return host * 1e3, (time.perf_counter() - start) * 1e3

    reads, fills, synced, colds, ops = [], [], [], [], []
    for i in range(adapters):
        warm = LoRARequest(f"w{i}", i + 1, paths[i])
        start = time.perf_counter()
        slots.prefetch(warm)
        slots._reading[warm.lora_int_id][1].result()  # the background read, waited for here to time it
        reads.append((time.perf_counter() - start) * 1e3)
        fill, fill_sync = step(warm)
        fills.append(fill)
        synced.append(fill_sync)
        colds.append(step(LoRARequest(f"c{i}", 1000 + i, paths[adapters + i]))[0])
        again = LoRARequest(f"o{i}", 2000 + i, paths[i])
        slots.prefetch(again)
        slots._reading[again.lora_int_id][1].result()
        ops.append(_count_ops(lambda: step(again)))  # noqa: B023
    probe = torch.zeros(4, device=device)

    def longest_gap(until: Any) -> float:
        """The longest gap (ms) between back-to-back tiny ops on this thread while ``until()`` is False."""
        gap, last = 0.0, time.perf_counter()
        while not until():
            probe.add_(1)
            now = time.perf_counter()
            gap, last = max(gap, now - last), now
        return gap * 1e3

    stalls, idle = [], []
    for i in range(adapters):
        idle_end = time.perf_counter() + 0.05
        idle.append(longest_gap(lambda: time.perf_counter() > idle_end))  # noqa: B023
        again = LoRARequest(f"s{i}", 3000 + i, paths[adapters + i])
        slots.prefetch(again)
        stalls.append(longest_gap(slots._reading[again.lora_int_id][1].done))
    mb = sum(t.numel() * t.element_size() for layer in wrapped.layers for t in (layer.lora_a[0], layer.lora_b[0]))
    out = {
        "device": device, "layers": layers, "rank": rank, "slot_mb": mb / 1e6, "torch_threads": torch.get_num_threads(),
        "read_ms": statistics.median(reads), "step_fill_ms": statistics.median(fills),
        "step_cold_ms": statistics.median(colds), "step_ops": max(ops),
        "loop_stall_ms": statistics.median(stalls), "loop_stall_idle_ms": statistics.median(idle),
        "all": {"read_ms": reads, "step_fill_ms": fills, "step_cold_ms": colds},
    }  # fmt: skip
    if cuda:
        out["step_fill_sync_ms"] = statistics.median(synced)
        held, pins = [], []
        for _ in range(3):  # held, so the caching host allocator cannot hand back a freed block
            start = time.perf_counter()
            held.append(torch.empty(int(mb) // 2, dtype=torch.bfloat16, pin_memory=True))
            pins.append((time.perf_counter() - start) * 1e3)
        out["pin_alloc_ms"] = statistics.median(pins)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4, help="adapters timed (each read and slotted once)")
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", default=None, help="where the adapters are written (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="kvik_lora_load_"))
    print(json.dumps(measure(args.layers, args.rank, args.adapters, args.max_loras, args.device, root), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
