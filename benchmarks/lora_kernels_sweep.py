"""Sweep the LoRA delta kernels on a GPU: old (BGMV) vs tiled SGMV/fused configs vs the base projection's matmul.

    export PYTHONPATH=$PWD/core:$PWD/platforms/cuda     # or pip install -e core -e platforms/cuda
    python3 benchmarks/lora_kernels_sweep.py            # ~3-4 min on an H200; --budget-s caps the grid
    python3 benchmarks/lora_kernels_sweep.py --smoke    # CPU, Triton's interpreter, tiny shapes: checks the script

8B projections (qkv 4096->6144 in 3 shards, o 4096->4096, gate_up 4096->28672 in 2 shards, down
14336->4096), rank 16, 64 adapter slots, 1/16/64/256/1024 token rows under three adapter mixes:
``a1`` (one adapter), ``a8g`` (8 adapters, rows grouped by adapter: what the scheduler produces)
``a8i`` (8 adapters interleaved at random: the worst case, each row its own SGMV tile; kept
to show what ungrouped rows would cost, timed for the old kernels and the table's config only) and ``a64g``
(64 adapters grouped: the issue's 64-adapter workload, ~4 rows per adapter at 256 rows; ``--mixes`` picks). For every case: the base bf16 matmul ``x @ W.T``, the
old BGMV kernels, the current table's config and a small grid of SGMV (two launches) and fused
(one launch; up to 256 rows) configs, each checked against ``kvik.lora.compute.add_lora_reference``
and timed two ways:
``graph_us`` (calls captured in a CUDA graph, replayed) and ``eager_us`` (back-to-back launches;
launch overhead included). Weights rotate over copies larger than L2 so neither side is timed
L2-warm. A failing config is recorded and skipped; the table-suggestion uses only correct ones.
The SGMV/fused tile map (kvik_cuda.lora_tiles) is built once per case and block_m outside the
timed calls, as the runner builds it once per step for 7 x 32 projection calls; its own cost is
timed per case as ``tile_map`` (graph_us / eager_us at block_m 16 and 64).

Prints one JSON document and writes it to $OUT/lora_kernels_sweep.json: ``cases`` (every timing),
``best`` (per case), ``configs_table`` (per token bucket, the config with the least summed
graph time / base time over the 4 projections and the mixes the engine produces, a1 and a8g) and ``configs_table_py``,
a ``CONFIGS = {...}`` literal to paste into platforms/cuda/kvik_cuda/lora_kernels.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from kvik.lora.compute import add_lora_reference
from kvik_cuda.lora_kernels import CONFIGS, LoRAKernelConfig, add_lora_triton, config_for
from kvik_cuda.lora_tiles import TileMap, build_tile_map

C = LoRAKernelConfig
GRID = [
    C(block_m=16, block_k=128, block_c=16, block_n=64, num_warps=4, num_stages=2),
    C(block_m=16, block_k=256, block_c=16, block_n=128, num_warps=4, num_stages=3),
    C(block_m=16, block_k=128, block_c=64, block_n=64, num_warps=2, num_stages=2),
    C(block_m=16, block_k=128, block_c=16, block_n=64, split_k=8, num_warps=4, num_stages=2),
    C(block_m=16, block_k=64, block_c=16, block_n=32, split_k=32, num_warps=4, num_stages=2),
    C(block_m=32, block_k=128, block_c=64, block_n=128, num_warps=4, num_stages=3),
    C(block_m=64, block_k=64, block_c=64, block_n=128, num_warps=4, num_stages=3),
    C(block_m=64, block_k=64, block_c=64, block_n=128, num_warps=4, num_stages=3, expand_precision="tf32x3"),
    C(block_m=64, block_k=128, block_c=64, block_n=256, num_warps=8, num_stages=3),
    C(block_m=64, block_k=64, block_c=64, block_n=128, num_warps=8, num_stages=4),
    C(block_m=128, block_k=64, block_c=64, block_n=128, num_warps=8, num_stages=3),
    # an expand grid of a few programs per SM walking the (tile, column block) items (run j3: 16 per SM wins)
    *(C(block_m=16, block_k=128, block_c=64, block_n=128, num_warps=4, num_stages=3, expand_precision="tf32x3",
        expand_per_sm=per_sm) for per_sm in (4, 8, 16)),
    C(block_m=64, block_k=64, block_c=64, block_n=128, num_warps=4, num_stages=3, expand_precision="tf32x3",
      expand_per_sm=8),
    *(C(block_m=16, block_k=128, block_c=64, block_n=bn, num_warps=w, num_stages=st, expand_precision="tf32x3",
        expand_per_sm=per_sm) for bn, w, st, per_sm in ((256, 4, 3, 16), (256, 8, 3, 8), (128, 2, 3, 32),
                                                        (64, 2, 2, 32), (128, 4, 2, 16), (128, 4, 3, 32))),
    C(kernel="fused", block_m=16, block_k=256, block_n=64, num_warps=4, num_stages=3),
    C(kernel="fused", block_m=16, block_k=128, block_n=32, num_warps=4, num_stages=2),
    C(kernel="fused", block_m=16, block_k=512, block_n=64, num_warps=8, num_stages=2),
    C(kernel="fused", block_m=32, block_k=256, block_n=128, num_warps=4, num_stages=3),
    C(kernel="bgmv", split_k=16),
]
OLD = C(kernel="bgmv")  # the BGMV kernels with their own split rule: what ran before the SGMV kernels
SHAPES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
          "down": (14336, (4096,))}  # fmt: skip
SMOKE_SHAPES = {"qkv": (64, (32, 16, 16)), "o": (64, (48,)), "down": (96, (32,))}
RANK, SLOTS, L2_BYTES = 16, 64, 128 << 20
TARGETS = {1: 0.15, 16: 0.25, 64: 0.25, 256: 0.25}
# Adapter mixes: name -> (adapters, rows grouped by adapter). The table is chosen over TABLE_MIXES.
MIXES = {"a1": (1, True), "a8g": (8, True), "a8i": (8, False), "a64g": (64, True)}
TABLE_MIXES = ("a1", "a8g", "a64g")


def name(cfg: LoRAKernelConfig) -> str:
    if cfg.kernel == "bgmv":
        return f"bgmv-sk{cfg.split_k}" if cfg.split_k else "bgmv"
    if cfg.kernel == "fused":
        return f"fused-m{cfg.block_m}-k{cfg.block_k}-n{cfg.block_n}-w{cfg.num_warps}-s{cfg.num_stages}"
    text = f"sgmv-m{cfg.block_m}-k{cfg.block_k}-c{cfg.block_c}-n{cfg.block_n}-w{cfg.num_warps}-s{cfg.num_stages}"
    text += f"-sk{cfg.split_k}" if cfg.split_k else ""
    text += f"-ps{cfg.expand_per_sm}" if cfg.expand_per_sm else ""
    return text + ("-tf32x3" if cfg.expand_precision != "ieee" else "")


def literal(cfg: LoRAKernelConfig) -> str:
    """``cfg`` as Python source, fields left at their defaults omitted."""
    default = C().as_dict()
    return f"LoRAKernelConfig({', '.join(f'{k}={v!r}' for k, v in cfg.as_dict().items() if v != default[k])})"


class Case:
    """One projection, token count and adapter mix: inputs, rotating weight copies, the reference output."""

    def __init__(self, proj: str, in_f: int, shards: tuple[int, ...], tokens: int, mix: str, device: str):
        adapters, grouped = MIXES[mix]
        self.key = f"{proj}@{tokens}/{mix}"
        self.proj, self.tokens, self.mix = proj, tokens, mix
        g = torch.Generator(device="cpu").manual_seed(tokens * 31 + adapters)
        out = sum(shards)
        self.starts = tuple(sum(shards[:k]) for k in range(len(shards)))
        bf16 = torch.bfloat16
        # Copies of the weights to rotate over, together larger than L2 (in a model's forward pass,
        # every other layer's weights stream through L2 between two calls of this projection).
        lora_copies, w_copies = (
            (1, 1) if device == "cpu" else
            (min(32, math.ceil(L2_BYTES / (SLOTS * RANK * (len(shards) * in_f + out) * 2))),
             min(8, math.ceil(L2_BYTES / (out * in_f * 2))))
        )  # fmt: skip
        self.a = [(torch.randn(SLOTS, len(shards) * RANK, in_f, generator=g) * 0.02).to(device, bf16)
                  for _ in range(lora_copies)]  # fmt: skip
        self.b = [(torch.randn(SLOTS, out, RANK, generator=g) * 0.02).to(device, bf16) for _ in range(lora_copies)]
        self.w = [(torch.randn(out, in_f, generator=g) * 0.02).to(device, bf16) for _ in range(w_copies)]
        self.x = torch.randn(tokens, in_f, generator=g).to(device, bf16)
        pick = torch.randint(0, adapters, (tokens,), generator=g)  # interleaved at random
        if grouped:  # the scheduler's order: each adapter's rows side by side (same rows as a8i, sorted)
            pick = pick.sort(stable=True).values
        self.slots = (pick * (SLOTS // adapters)).to(device)
        self.maps: dict[int, TileMap] = {}  # block_m -> this case's tile map (one per step in the engine)
        self.y0 = self.x @ self.w[0].T
        self.want = self.y0.clone()
        add_lora_reference(self.want, self.x, self.a[0], self.b[0], self.slots, self.starts)
        self.y = self.y0.clone()

    def tiles(self, cfg: LoRAKernelConfig) -> TileMap | None:
        if cfg.kernel == "bgmv":
            return None
        if cfg.block_m not in self.maps:
            self.maps[cfg.block_m] = build_tile_map(self.slots, cfg.block_m)
        return self.maps[cfg.block_m]

    def check(self, cfg: LoRAKernelConfig) -> dict[str, Any]:
        got = self.y0.clone()
        add_lora_triton(got, self.x, self.a[0], self.b[0], self.slots, self.starts, config=cfg, tiles=self.tiles(cfg))
        err = (got.float() - self.want.float()).abs().max().item()
        scale = self.want.float().abs().max().item()
        exact = (got == self.want).float().mean().item()
        return {"max_abs_err": err, "exact_frac": exact, "ok": bool(err <= 0.02 * scale + 1e-2)}

    def lora_call(self, cfg: LoRAKernelConfig, i: int) -> None:
        k = i % len(self.a)
        tiles = self.tiles(cfg)
        add_lora_triton(self.y, self.x, self.a[k], self.b[k], self.slots, self.starts, config=cfg, tiles=tiles)

    def map_call(self, block_m: int, i: int) -> None:
        build_tile_map(self.slots, block_m)

    def base_call(self, i: int) -> None:
        torch.matmul(self.x, self.w[i % len(self.w)].T, out=self.y)


def timed(call: Any, copies: int, iters: int) -> dict[str, float]:
    """Microseconds per call: eager (back-to-back launches) and replayed from a CUDA graph."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        call(0)
        return {"eager_us": (time.perf_counter() - start) * 1e6, "graph_us": float("nan")}
    per_graph = max(copies, 16)
    for i in range(per_graph):  # warm-up: compile, autotune-free first launches
        call(i)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for i in range(iters):
        call(i)
    end.record()
    torch.cuda.synchronize()
    eager = begin.elapsed_time(end) * 1e3 / iters
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i in range(per_graph):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    replays = max(1, iters // per_graph)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return {"eager_us": eager, "graph_us": begin.elapsed_time(end) * 1e3 / (replays * per_graph)}


def run_config(case: Case, cfg: LoRAKernelConfig, iters: int) -> dict[str, Any]:
    try:
        result = case.check(cfg)
        if result["ok"]:
            result.update(timed(lambda i: case.lora_call(cfg, i), len(case.a), iters))
        return result
    except Exception as exc:  # one config failing (compile, resources) must not stop the sweep
        traceback.print_exc()
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def suggest(cases: list[dict[str, Any]], token_counts: list[int]) -> dict[int, str]:
    """Per token bucket, the config with the least sum of graph_us / base graph_us over its cases."""
    table: dict[int, str] = {}
    metric = "graph_us" if torch.cuda.is_available() else "eager_us"
    for tokens in token_counts:
        rows = [c for c in cases if c["tokens"] == tokens and c["mix"] in TABLE_MIXES]
        scores: dict[str, float] = {}
        for cfg_name in {n for c in rows for n in c["configs"]}:
            runs = [c["configs"].get(cfg_name, {}) for c in rows]
            if all(r.get("ok") and metric in r for r in runs):
                scores[cfg_name] = sum(r[metric] / c["base"][metric] for r, c in zip(runs, rows, strict=True))
        if scores:
            table[tokens] = min(scores, key=scores.__getitem__)
    return table


def summary(result: dict[str, Any], metric: str) -> str:
    """The tail a reader sees first: per case the base, old, table and best times (us), then the table."""
    lines = [f"{'case':<18} {'base':>8} {'old':>8} {'table':>8} {'best':>8} ratio  target  best config ({metric})"]
    for row in result["cases"]:
        configs, best = row["configs"], result["best"].get(row["key"], {})

        def us(cfg_name: str, configs: dict[str, Any] = configs) -> str:
            return f"{configs.get(cfg_name, {}).get(metric, math.nan):8.1f}"

        lines.append(
            f"{row['key']:<18} {row['base'][metric]:8.1f} {us(row['old'])} {us(row['table'])} "
            f"{best.get(metric, math.nan):8.1f} {best.get('ratio', math.nan):5.2f}  {best.get('target') or '':<6}  "
            f"{best.get('config', '-')}"
        )
    maps = [
        f"tile map us ({metric}, block_m 16/64) @{row['key']}: "
        + "/".join(f"{row['tile_map'].get(m, {}).get(metric, math.nan):.1f}" for m in (16, 64))
        for row in result["cases"]
        if row["proj"] == result["cases"][0]["proj"]  # the map depends on the rows only, not the projection
    ]
    return "\n".join([*lines, *maps, *result["errors"], result["configs_table_py"]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,16,64,256,1024")
    parser.add_argument("--mixes", default="a1,a8g,a8i", help=f"adapter mixes, of {', '.join(MIXES)}")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=210.0, help="stop the config grid after this long")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    parser.add_argument("--configs", help="comma-separated grid config names (name()); default: the whole grid")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes, token_counts = (
        (SMOKE_SHAPES, [1, 5, 20]) if args.smoke else (SHAPES, [int(t) for t in args.tokens.split(",")])
    )
    grid = GRID[:2] + GRID[-3:] if args.smoke else GRID
    if args.configs:
        wanted = args.configs.split(",")
        unknown = sorted(set(wanted) - {name(c) for c in GRID})
        if unknown:
            parser.error(f"not grid configs: {', '.join(unknown)}")
        grid = [c for c in grid if name(c) in wanted]
    start = time.perf_counter()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                              "sgmv_tiles": "one slot per tile (kvik_cuda.lora_tiles map)", "table_mixes": TABLE_MIXES,
                              "torch": torch.__version__, "table_before": {k: name(v) for k, v in CONFIGS.items()},
                              "cases": [], "errors": []}  # fmt: skip
    import triton

    result["triton"] = triton.__version__
    cases: list[Case] = []
    for proj, (in_f, shards) in shapes.items():
        for tokens in token_counts:
            for mix in [m for m in args.mixes.split(",") if m in MIXES] if tokens > 1 else ("a1",):
                try:
                    case = Case(proj, in_f, shards, tokens, mix, device)
                    row = {"key": case.key, "proj": proj, "tokens": tokens, "mix": mix, "tile_map": {},
                           "base": timed(case.base_call, len(case.w), args.iters), "configs": {}}  # fmt: skip
                    for block_m in (16, 64):  # the per-step map (amortised over a step's 224 projection calls)
                        try:
                            row["tile_map"][block_m] = timed(lambda i, c=case, m=block_m: c.map_call(m, i), 1, args.iters)
                            row["tile_map"][block_m]["tiles"] = int(build_tile_map(case.slots, block_m).count.item())
                        except Exception as exc:
                            row["tile_map"][block_m] = {"error": f"{type(exc).__name__}: {exc}"}
                    # First pass: the old kernels and the current table's choice, for every case.
                    for cfg in (OLD, config_for(tokens)):
                        row["configs"][name(cfg)] = run_config(case, cfg, args.iters)
                    row["old"], row["table"] = name(OLD), name(config_for(tokens))
                    cases.append(case)
                    result["cases"].append(row)
                except Exception as exc:
                    traceback.print_exc()
                    result["errors"].append(f"{proj}@{tokens}/{mix}: {type(exc).__name__}: {exc}")
    print(f"[first pass] {time.perf_counter() - start:.1f} s", flush=True)
    for cfg in grid:  # second pass: the grid, config by config (one compile each), until the budget is spent
        for case, row in zip(cases, result["cases"], strict=True):
            too_big = cfg.block_m > max(16, 2 * case.tokens) or (cfg.kernel == "fused" and case.tokens > 256)
            # The interleaved worst case (a8i) gets only the first pass: the table never sees it.
            if name(cfg) in row["configs"] or too_big or case.mix not in TABLE_MIXES:
                continue
            if time.perf_counter() - start > args.budget_s:
                row["configs"][name(cfg)] = {"ok": False, "error": "skipped: --budget-s spent"}
                continue
            row["configs"][name(cfg)] = run_config(case, cfg, args.iters)
        print(f"[{name(cfg)}] {time.perf_counter() - start:.1f} s", flush=True)
    metric = "graph_us" if device == "cuda" else "eager_us"
    best: dict[str, Any] = {}
    for row in result["cases"]:
        ran = {n: r for n, r in row["configs"].items() if r.get("ok") and metric in r}
        if ran:
            top = min(ran, key=lambda n: ran[n][metric])
            base = row["base"][metric]
            best[row["key"]] = {"config": top, metric: ran[top][metric], "base": base,
                                "ratio": ran[top][metric] / base,
                                "old_ratio": ran.get(row["old"], {}).get(metric, math.nan) / base,
                                "table_ratio": ran.get(row["table"], {}).get(metric, math.nan) / base,
                                "target": TARGETS.get(row["tokens"])}  # fmt: skip
    result["best"] = best
    # Buckets with no correct timed config keep the current table's entry.
    table = {t: name(config_for(t)) for t in token_counts} | suggest(result["cases"], token_counts)
    by_name = {name(c): c for c in (*GRID, OLD, *CONFIGS.values())}
    result["configs_table"] = {t: by_name[n].as_dict() for t, n in table.items()}
    lines = [f"    {t}: {literal(by_name[n])}," for t, n in table.items()]
    result["configs_table_py"] = "\n".join(["CONFIGS: dict[int, LoRAKernelConfig] = {", *lines, "}"])
    result["elapsed_s"] = time.perf_counter() - start
    text = json.dumps(result, indent=1, default=str)
    print(text)
    print(summary(result, metric))
    out = Path(os.environ.get("OUT", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_kernels_sweep.json").write_text(text)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
