"""Does launching a CUDA graph whose previous launch is still running block the host? (issue 21)

With async scheduling the engine launches decode step n+1 while step n runs, and in steady decoding both
are the same captured graph (one batch-size bucket). docs/benchmarks.md found the 8B's launch phase
growing by ~5 ms a step once async scheduling was on, with no synchronizing call on the step path
(``host_syncs.py``). This probe captures a graph of ``--kernels`` matmuls (a few ms of GPU work), then
measures the host time of ``graph.replay()`` in three cases, each after an idle GPU:

* ``first``: the GPU idle;
* ``same_exec_in_flight``: the same graph launched again while its first launch runs;
* ``other_exec_in_flight``: a second capture of the same work launched while the first graph runs.

    python3 benchmarks/graph_relaunch_probe.py      # H200: ~20 s; prints one RESULT line
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=int, default=60)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    a = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)

    def work() -> None:
        for _ in range(args.kernels):
            torch.matmul(a, b, out=out)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        work()  # warm-up (cuBLAS handles, workspaces) outside capture
    torch.cuda.synchronize()
    graphs = []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            work()
        graphs.append(g)
    torch.cuda.synchronize()

    def host_ms(fn: object) -> float:
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        return (time.perf_counter() - t) * 1e3

    graphs[0].replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    graphs[0].replay()
    torch.cuda.synchronize()
    gpu_ms = (time.perf_counter() - t) * 1e3
    cases: dict[str, list[float]] = {"first": [], "same_exec_in_flight": [], "other_exec_in_flight": []}
    for _ in range(args.rounds):
        torch.cuda.synchronize()
        cases["first"].append(host_ms(graphs[0].replay))
        cases["same_exec_in_flight"].append(host_ms(graphs[0].replay))
        torch.cuda.synchronize()
        graphs[0].replay()
        cases["other_exec_in_flight"].append(host_ms(graphs[1].replay))
    torch.cuda.synchronize()
    result = {"graph_gpu_ms": round(gpu_ms, 3), "kernels": args.kernels, "torch": torch.__version__,
              **{k: round(statistics.median(v), 4) for k, v in cases.items()}}  # fmt: skip
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    main()
