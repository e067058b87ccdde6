"""One LoRA delta case, its SGMV shrink and expand timed apart, for reading (and for Nsight Compute).

    python3 benchmarks/lora_kernel_profile.py --proj gate_up --tokens 256 --mix a64g     # H200: seconds
    ncu -k regex:_sgmv --launch-skip 4 --launch-count 2 --section SpeedOfLight --section WarpStateStats \\
        --section LaunchStats --section Occupancy python3 benchmarks/lora_kernel_profile.py --iters 3
    python3 benchmarks/lora_kernel_profile.py --smoke    # CPU, Triton's interpreter: checks the script

The case is lora_kernels_sweep.py's (8B projection, rank 16, 64 slots, weights rotating over copies larger
than L2). ``--config`` names a config of that sweep's grid (its ``name()``), default the table's config for
the row count (or the grid's first SGMV config where the table runs BGMV). Each kernel is replayed from a CUDA graph of 16 calls over the rotating copies. The result is
compared with the bytes each one must move and its launch grid. Printed as JSON, also to
$OUT/lora_kernel_profile.json. Issue 16: at 256 rows and 64 adapters the delta costs 1.5-2.7x the base
matmul (run h8), far above its bytes; this says which of the two kernels is responsible, and why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import lora_kernels_sweep as sweep
    import triton
    from kvik_cuda.lora_kernels import config_for
    from kvik_cuda.lora_sgmv import sgmv_expand, sgmv_shrink, sgmv_splits, shrink_block_c
    from kvik_cuda.lora_tiles import tile_programs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proj", choices=sorted(sweep.SHAPES), default="gate_up")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--mix", choices=sorted(sweep.MIXES), default="a64g")
    ap.add_argument("--config", help="a grid config's name (lora_kernels_sweep.name); default: the table's")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: checks the script")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = sweep.SMOKE_SHAPES if args.smoke else sweep.SHAPES
    proj = args.proj if args.proj in shapes else "qkv"
    tokens = 16 if args.smoke else args.tokens
    in_f, shards = shapes[proj]
    case = sweep.Case(proj, in_f, shards, tokens, args.mix, device)
    grid = {sweep.name(c): c for c in sweep.GRID}
    cfg = grid[args.config] if args.config else config_for(tokens)
    if cfg.kernel != "sgmv" and not args.config:  # the table runs BGMV at this size: take the grid's first SGMV
        cfg = next(c for c in sweep.GRID if c.kernel == "sgmv")
    if cfg.kernel != "sgmv":
        raise SystemExit(f"{sweep.name(cfg)} is not an SGMV config: this script times the SGMV kernels apart")
    tiles = case.tiles(cfg)
    assert tiles is not None
    num_cols = case.a[0].shape[1]
    out_f = case.b[0].shape[1]
    shrunk = sgmv_shrink(case.x, case.a[0], tiles, cfg)
    check = case.y0.clone()
    sgmv_expand(check, shrunk, case.b[0], tiles, case.starts, cfg)
    err = float((check.float() - case.want.float()).abs().max())

    def shrink(i: int) -> None:
        sgmv_shrink(case.x, case.a[i % len(case.a)], tiles, cfg)

    def expand(i: int) -> None:
        sgmv_expand(case.y, shrunk, case.b[i % len(case.b)], tiles, case.starts, cfg)

    programs = tile_programs(tokens, cfg.block_m, case.a[0].shape[0])
    splits = sgmv_splits(tokens, in_f, num_cols, cfg)
    adapters = int(torch.unique(case.slots).numel())
    tile_count = int(tiles.count.item())
    result: dict[str, Any] = {
        "case": case.key, "config": sweep.name(cfg), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "max_abs_err": err, "adapters": adapters, "tiles": tile_count, "splits": splits,
        "shrink_grid": [programs, triton.cdiv(num_cols, shrink_block_c(num_cols, cfg)), splits],
        "expand_grid": [programs, triton.cdiv(out_f, cfg.block_n)],
        # What each kernel must move at least: the step's adapters' A (or B) once, x (or y twice), the partials.
        "shrink_min_mb": round((adapters * num_cols * in_f * 2 + tokens * in_f * 2 + 2 * splits * tokens * num_cols * 4) / 1e6, 2),
        "expand_min_mb": round((adapters * out_f * sweep.RANK * 2 + 2 * tokens * out_f * 2 + tokens * num_cols * 4) / 1e6, 2),
        "base_us": sweep.timed(case.base_call, len(case.w), args.iters),
        "shrink_us": sweep.timed(shrink, len(case.a), args.iters),
        "expand_us": sweep.timed(expand, len(case.b), args.iters),
    }  # fmt: skip
    for part in ("shrink", "expand"):
        us = result[f"{part}_us"]["graph_us"]
        if us == us:  # not NaN (the CPU has no graph time)
            result[f"{part}_tb_s"] = round(result[f"{part}_min_mb"] / us, 3)
    print(json.dumps(result, indent=1))
    (Path(os.environ.get("OUT", "/tmp")) / "lora_kernel_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
