"""What an adapter's first use costs the engine loop, on the CPU: the 8B shape's adapter path without the model.

    PYTHONPATH=core python3 benchmarks/lora_load_cpu.py            # the 8B shape (hidden 4096, 32 layers), rank 16
    PYTHONPATH=core python3 benchmarks/lora_load_cpu.py --layers 2  # a quick run (the per-layer costs scale)

The base layers are built on the meta device (no 16 GB of weights); only the adapter slots
(``max_loras`` of them, ~84 MB each for rank 16) are real, so the adapter path runs at its true
size: :class:`kvik.lora.slots.LoRASlots` reads random PEFT adapters (written like
``benchmarks/lora_throughput.py`` writes them, bf16) and fills slots as an engine step does.
It times, per adapter:

- ``read_ms``: the host read (``prefetch``: on a background thread from admission);
- ``step_fill_ms``: the step's :meth:`LoRASlots.token_slots` for a step that brings in an adapter
  whose prefetch has finished (what the engine loop pays on its thread);
- ``step_cold_ms``: the same for an adapter nobody prefetched (read on the step);
- ``step_ops``: the torch calls the step's slot fill makes (each is a launch on a GPU).

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4, help="adapters timed (each read and slotted once)")
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--root", default=None, help="where the adapters are written (default: a temp dir)")
    args = parser.parse_args()

    import torch
    from kvik.lora.layers import wrap_model
    from kvik.lora.request import LoRARequest
    from kvik.lora.slots import LoRASlots
    from kvik.sampling_params import SamplingParams
    from kvik.scheduling.output import ScheduledRequest
    from kvik.testing.tiny_lora import write_random_adapter

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                          num_hidden_layers=args.layers)  # fmt: skip
    root = Path(args.root or tempfile.mkdtemp(prefix="kvik_lora_load_"))
    paths = []
    for i in range(args.adapters * 2):  # half prefetched, half cold; distinct files (no shared page-cache hits)
        path = root / f"a{i}"
        if not (path / "adapter_model.safetensors").exists():
            write_random_adapter(path, cfg, rank=args.rank, seed=i)
        paths.append(str(path))
    model = _model(args.layers, 4096, 32, 8, 14336)
    wrapped = wrap_model(model, args.max_loras, args.rank, 64, device=torch.device("cpu"), dtype=torch.bfloat16)
    slots = LoRASlots(wrapped, args.max_loras, args.adapters * 3, args.rank)  # room for all: every prefetch runs
    for path in paths:  # warm the page cache: the H200 run reads its one adapter file from it
        Path(path, "adapter_model.safetensors").read_bytes()

    def step(request: LoRARequest) -> float:
        sched = ScheduledRequest("r", [1], 0, [0], False, SamplingParams(), lora_request=request)
        start = time.perf_counter()
        slots.token_slots([sched], 1)
        return (time.perf_counter() - start) * 1e3

    reads, fills, colds, ops = [], [], [], []
    for i in range(args.adapters):
        warm = LoRARequest(f"w{i}", i + 1, paths[i])
        start = time.perf_counter()
        slots.prefetch(warm)
        slots._reading[warm.lora_int_id][1].result()  # the background read, waited for here to time it
        reads.append((time.perf_counter() - start) * 1e3)
        fills.append(step(warm))
        cold = LoRARequest(f"c{i}", 1000 + i, paths[args.adapters + i])
        colds.append(step(cold))
        again = LoRARequest(f"o{i}", 2000 + i, paths[i])
        slots.prefetch(again)
        slots._reading[again.lora_int_id][1].result()
        ops.append(_count_ops(lambda: step(again)))  # noqa: B023
    mb = sum(t.numel() * t.element_size() for layer in wrapped.layers for t in (layer.lora_a[0], layer.lora_b[0]))
    summary = {
        "layers": args.layers, "rank": args.rank, "slot_mb": mb / 1e6, "torch_threads": torch.get_num_threads(),
        "read_ms": statistics.median(reads), "step_fill_ms": statistics.median(fills),
        "step_cold_ms": statistics.median(colds), "step_ops": max(ops),
        "all": {"read_ms": reads, "step_fill_ms": fills, "step_cold_ms": colds},
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
