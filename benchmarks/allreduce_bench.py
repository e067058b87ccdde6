"""Two-GPU all-reduce latency at decode sizes: NCCL against torch's symmetric-memory one-shot and
two-shot all-reduces (P2P over NVLink, no multicast), eager and inside a CUDA graph.

    python3 benchmarks/allreduce_bench.py        # 2 GPUs; prints one JSON line per case; $OUT/allreduce.json

Each case sums a [rows, hidden] bf16 tensor over both ranks 64 times (a decode step's worth for a
32-layer model) and reports microseconds per all-reduce (the best of 5 replays), after checking the sum.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN = (4096, 8192)
ROWS = (1, 8, 64, 256)
REPEATS = 64


def _time(fn, graph: bool) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    best = float("inf")
    for _ in range(5):
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best / REPEATS * 1e6


def _worker(rank: int, port: int, out: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    group = dist.group.WORLD
    name = group.group_name
    results = []
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(name)
        symm = symm_mem.empty(max(ROWS) * max(HIDDEN), dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(symm, name)
    except Exception:
        results.append({"symm_mem_error": traceback.format_exc(limit=3)[-800:]})
        symm = None
    for hidden in HIDDEN:
        for rows in ROWS:
            x = torch.full((rows, hidden), float(rank + 1), dtype=torch.bfloat16, device="cuda")
            n = x.numel()
            cases = {"nccl": lambda x=x: [dist.all_reduce(x.clone(), group=group) for _ in range(REPEATS)]}
            if symm is not None:

                def one_shot(x=x, n=n):
                    for _ in range(REPEATS):
                        symm[:n].copy_(x.view(-1))
                        torch.ops.symm_mem.one_shot_all_reduce(symm[:n], "sum", name)

                def two_shot(x=x, n=n):
                    for _ in range(REPEATS):
                        symm[:n].copy_(x.view(-1))
                        torch.ops.symm_mem.two_shot_all_reduce_(symm[:n], "sum", name)

                cases["one_shot"] = one_shot
                cases["two_shot"] = two_shot
            for case, fn in cases.items():
                for graph in (False, True):
                    row = {"case": case, "graph": graph, "rows": rows, "hidden": hidden}
                    try:
                        if case == "one_shot":
                            symm[:n].copy_(x.view(-1))
                            got = torch.ops.symm_mem.one_shot_all_reduce(symm[:n], "sum", name)
                            row["correct"] = bool((got == 3).all())
                        row["us"] = round(_time(fn, graph), 2)
                    except Exception:
                        row["error"] = traceback.format_exc(limit=2)[-600:]
                    results.append(row)
                    if rank == 0:
                        print(json.dumps(row), flush=True)
    if rank == 0 and out:
        Path(out, "allreduce.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def main() -> int:
    if torch.cuda.device_count() < 2:
        print("needs 2 GPUs")
        return 1
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(port, os.environ.get("OUT", "")), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
