"""Tile sweep for the fused-MoE decode GEMV (kvik_cuda.moe._pairwise_gemv) at Qwen3-30B-A3B's shapes.

    python benchmarks/moe_gemv_sweep.py [--pairs 8] [--budget-s 150]

At batch 1 a Qwen3-30B-A3B layer reads 8 experts' weights: gate_up [1536, 2048] and down
[2048, 768] (the down GEMV computes silu(gate) * up as it loads its input). Each candidate
(BLOCK_N, BLOCK_K, num_warps, reduce_once) is timed as a CUDA graph of 32 launches, each routed to a
different random set of experts so that the weights come from HBM, not L2 (the 128 experts'
weights are 0.8 GB; one set is 50 MB, the H200's L2). Reported: µs per launch and the share of
the 4.8 TB/s HBM peak the weight bytes reach. JSON to stdout and $OUT/moe_gemv_sweep.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

PEAK_BYTES_S = 4.8e12
SHAPES = {"gate_up": (128, 1536, 2048, False), "down_silu": (128, 2048, 768, True)}  # E, N, K, silu on load
# Dense [N, K] weights at one row: Qwen3-30B-A3B's qkv / o_proj / router, Llama-8B's qkv / o / gate_up / down.
DENSE = [(5120, 2048), (2048, 4096), (128, 2048), (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
DENSE_TILES = [(16, 256, 4, False), (8, 256, 4, False), (32, 256, 8, False), (16, 512, 4, False), (8, 512, 4, False),
               (4, 512, 4, False), (2, 256, 1, True), (4, 256, 1, True)]  # fmt: skip


def graph_us(fn, launches: int) -> float:
    """Best of 5 replays of a CUDA graph of ``fn`` (which makes ``launches`` launches), per launch."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / launches)
    return best


def dense_part(moe, deadline: float) -> dict[str, dict]:
    """cuBLAS (F.linear) against the pairwise GEMV kernel with one expert, one row, weights from HBM."""
    out: dict[str, dict] = {}
    for n_out, k_in in DENSE:
        if time.monotonic() > deadline:
            break
        size = n_out * k_in * 2
        row = dense_row(moe, n_out, k_in, min(64, max(4, -(-200_000_000 // size))))  # > 4x L2: reads from HBM
        best = min((v, k) for k, v in row.items() if isinstance(v, float) and k != "cublas_us")
        row["best_triton"] = best[1]
        row["hbm_share_cublas"] = round(size / (row["cublas_us"] * 1e-6) / PEAK_BYTES_S, 3)
        row["hbm_share_triton"] = round(size / (best[0] * 1e-6) / PEAK_BYTES_S, 3)
        out[f"{n_out}x{k_in}"] = row
        print("PART dense", n_out, k_in, json.dumps(row), flush=True)
    return out


def dense_row(moe, n_out: int, k_in: int, copies: int) -> dict:
    import torch.nn.functional as F

    dev = torch.device("cuda")
    ws = [torch.randn(1, n_out, k_in, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k_in, device=dev, dtype=torch.bfloat16)
    y = torch.empty(1, n_out, device=dev, dtype=torch.bfloat16)
    ids = torch.zeros(1, dtype=torch.int64, device=dev)
    row: dict = dict(cublas_us=round(graph_us(lambda: [F.linear(x, w[0]) for w in ws], copies), 2))
    for tile in DENSE_TILES:
        moe.gemv_config = lambda n, k, t=tile: t
        try:
            row[str(tile)] = round(graph_us(lambda: [moe._pairwise_gemv(x, w, y, ids, 1) for w in ws], copies), 2)
        except Exception as exc:  # a tile that does not compile: recorded, the others still run
            row[str(tile)] = str(exc)[:100]
    return row


def time_config(moe, shape: tuple[int, int, int, bool], pairs: int, cfg: tuple[int, int, int, bool]) -> float:
    experts, n_out, k_in, silu = shape
    dev = torch.device("cuda")
    w = torch.randn(experts, n_out, k_in, device=dev, dtype=torch.bfloat16)
    a = torch.randn(pairs, 2 * k_in if silu else k_in, device=dev, dtype=torch.bfloat16)
    out = torch.empty(pairs, n_out, device=dev, dtype=torch.bfloat16)
    scale = torch.rand(pairs, device=dev, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    id_sets = [torch.randperm(experts, generator=gen)[:pairs].to(dev) for _ in range(32)]
    moe.gemv_config = lambda n, k: cfg

    def launch_all() -> None:
        for ids in id_sets:
            moe._pairwise_gemv(a, w, out, ids, 1, scale=scale if silu else None, silu_a=silu)

    return graph_us(launch_all, len(id_sets))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[8])
    ap.add_argument("--budget-s", type=float, default=150)
    ap.add_argument("--dense", action="store_true", help="also time dense one-row GEMVs against cuBLAS (~1 min)")
    ap.add_argument("--only-dense", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import kvik_cuda.moe as moe

    default = moe.gemv_config
    deadline = time.monotonic() + args.budget_s
    results: dict[str, list[dict]] = {}
    candidates = [(*c, False) for c in itertools.product([8, 16, 32, 64], [128, 256, 512], [2, 4, 8])]
    # One warp, a few rows, a register tile reduced once (kvik_cuda.gemv's layout: no shuffles in the loop).
    candidates += [(bn, bk, w, True) for bn, bk, w in itertools.product([2, 4, 8], [256, 512], [1, 2])]
    for (name, shape), pairs in itertools.product(SHAPES.items() if not args.only_dense else [], args.pairs):
        _, n_out, k_in, _ = shape
        key = f"{name}/pairs{pairs}"
        first = default(n_out, k_in)
        rows = []
        for cfg in [first] + [c for c in candidates if c != first]:
            if time.monotonic() > deadline:
                break
            try:
                us = time_config(moe, shape, pairs, cfg)
            except Exception as exc:  # a tile that does not compile: skip it, keep the rest
                rows.append(dict(config=cfg, error=str(exc)[:200]))
                continue
            gbs = pairs * n_out * k_in * 2 / (us * 1e-6)
            rows.append(dict(config=cfg, us=round(us, 2), hbm_share=round(gbs / PEAK_BYTES_S, 3), default=cfg == first))
        timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        results[key] = timed[:8] + [r for r in timed if r["default"] and r not in timed[:8]]
        print("PART", key, json.dumps(results[key][:3]), flush=True)
    dense = dense_part(moe, time.monotonic() + 90) if args.dense else {}
    text = json.dumps(dict(results=results, dense=dense), indent=1)
    print("RESULT", text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "moe_gemv_sweep.json").write_text(text)


if __name__ == "__main__":
    main()
