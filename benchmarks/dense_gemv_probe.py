"""The one-row dense GEMV (kvik_cuda.gemv) against cuBLAS (F.linear) on the 8B's and Qwen3-30B-A3B's dense shapes.

    python3 benchmarks/dense_gemv_probe.py          # H200: ~1 min; prints JSON, writes $OUT/dense_gemv_probe.json
    python3 benchmarks/dense_gemv_probe.py --e2e llama8b   # batch-1 decode, GEMV on vs off
    python3 benchmarks/dense_gemv_probe.py --e2e llama8b --config 2,512,16,1   # default vs that config
    python3 benchmarks/dense_gemv_probe.py --e2e llama8b,qwen3_30b_a3b --config 2,256,16,1   # vs the plain loop
    python3 benchmarks/dense_gemv_probe.py --shapes moe_qkv,moe_o   # the grid on some shapes only
    python3 benchmarks/dense_gemv_probe.py --e2e llama8b --config best   # the config the last sweep liked best

``--e2e``: for each shape (gpu_common.py's Llama shapes or models_gpu.py's, e.g. ``qwen3_30b_a3b``; random
weights drawn on the GPU, ``load_format="dummy"``), batch-1 decode
ms/token (512-token prompt, 128 new tokens minus 1, best of two) with the fused one-row GEMV and, in a
second process, with Linear / LMHead left to cuBLAS (every other fused layer on in both); to $OUT/dense_gemv_e2e.json.

Each shape: cuBLAS and a grid of configs, CUDA-graph replayed over weight copies larger than L2 (the timer of
quant_kernels_sweep.py), every config checked against float64.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {  # name: (K, N)
    "8b_qkv": (4096, 6144), "8b_o": (4096, 4096), "8b_gate_up": (4096, 28672), "8b_down": (14336, 4096),
    "8b_lm_head": (4096, 128256), "moe_qkv": (2048, 5120), "moe_o": (4096, 2048), "moe_router": (2048, 128),
}  # fmt: skip
# (block_n, block_k, per_sm, warps)
GRID = [(8, 256, 8, 1), (4, 256, 8, 1), (16, 256, 8, 1), (8, 256, 16, 1), (8, 512, 8, 2), (4, 256, 16, 1),
        (8, 256, 4, 1), (16, 512, 4, 2), (2, 256, 16, 1),
        # one warp with 16 k per thread and row a step: twice the bytes in flight per program (the small
        # shapes read at ~half the copy bandwidth with 8)
        (2, 512, 16, 1), (4, 512, 16, 1), (2, 512, 32, 1), (1, 512, 32, 1), (2, 1024, 16, 1), (2, 512, 8, 1),
        # (..., unroll): several k-steps' loads in flight at once (the plain loop waits for each step's).
        # Run m also tried Triton's software pipelining (tl.range num_stages 3-4): no better than unroll 4.
        (2, 256, 16, 1, 2), (2, 256, 16, 1, 4), (2, 256, 16, 1, 8), (4, 256, 16, 1, 4),
        (2, 256, 8, 1, 4), (2, 256, 8, 1, 2), (2, 512, 8, 1, 2),
        # No split for Qwen3-30B-A3B's o (1,024 row blocks; the default splits it in two, and its completion
        # path, an atomic and a re-read of the partials, is the likely reason o takes 2.1x its floor where qkv
        # takes 1.5x): fewer programs, each with more k-steps, and more of them in flight.
        (2, 256, 4, 1, 4), (2, 256, 4, 1, 8), (2, 512, 4, 1, 4), (1, 256, 8, 1, 8)]  # fmt: skip


def config_of(cfg: tuple[int, ...]) -> object:
    """A grid entry as a DenseGemvConfig: (block_n, block_k, per_sm, warps[, unroll]); no unroll: the plain loop."""
    from kvik_cuda.gemv import DenseGemvConfig

    return DenseGemvConfig(*cfg[:4], unroll=cfg[4] if len(cfg) > 4 else 1)


def label(cfg: tuple[int, ...]) -> str:
    bn, bk, per_sm, warps, *unroll = cfg
    return f"gemv:{bn}x{bk}:s{per_sm}:w{warps}" + (f":u{unroll[0]}" if unroll else "")


def measure(sweep, k: int, n: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    from kvik_cuda.gemv import dense_gemv
    from quant_kernels_sweep import copies_for

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    copies = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
    x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
    ref = x.double() @ w.double().t()
    row: dict[str, object] = {"floor_us": round(n * k * 2 / 4.27e6, 2)}
    row["cublas"] = sweep.time_us([lambda c=c: F.linear(x, c) for c in copies])
    for grid_cfg in GRID:
        cfg = config_of(grid_cfg)
        try:
            err = float((dense_gemv(x, w, cfg).double() - ref).abs().max() / ref.abs().max())
            t = sweep.time_us([lambda c=c, g=cfg: dense_gemv(x, c, g) for c in copies])
        except Exception as exc:  # a config this Triton cannot compile: recorded, the sweep goes on
            row[label(grid_cfg)] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        row[label(grid_cfg)] = {**t, "rel_err": round(err, 6)}
    return row


def batch1(shape: str, gemv: bool, config: tuple[int, ...] | None = None) -> dict[str, float]:
    """Batch-1 decode ms/token of ``shape`` with or without the one-row GEMV (run in its own process); with
    ``config``, the fused layers' GEMVs use that (block_n, block_k, per_sm, warps[, unroll]) instead of
    the default."""
    import functools

    import kvik
    from gpu_common import SHAPES as MODEL_SHAPES
    from gpu_common import batch1_decode_ms, dummy_model_dir

    if config is not None:
        from kvik_cuda import fused
        from kvik_cuda.gemv import dense_gemv

        fused.dense_gemv = functools.partial(dense_gemv, config=config_of(config))  # type: ignore[assignment]
    if not gemv:
        from kvik.layers.embedding import LMHead
        from kvik.layers.linear import Linear
        from kvik_cuda import fused

        del fused._FUSED[Linear], fused._FUSED[LMHead]
    if shape in MODEL_SHAPES:
        path = dummy_model_dir(Path("/tmp/kvik_models"), shape)
        vocab = MODEL_SHAPES[shape]["vocab_size"]
    else:  # models_gpu.py's shapes (qwen3_30b_a3b: the MoE's qkv / o / router)
        from models_gpu import CONFIGS, config_dir

        path = config_dir(shape, Path("/tmp/kvik_models"))
        vocab = CONFIGS[shape]["vocab_size"]
    llm = kvik.LLM(model=str(path), load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=32,
                   gpu_memory_utilization=0.9)  # fmt: skip
    return {"ms_per_token": round(batch1_decode_ms(llm, vocab), 3)}


def e2e(shapes: list[str], config: tuple[int, ...] | None = None) -> None:
    """Per shape: the default GEMV, then cuBLAS or (with ``config``) the GEMV with that config."""
    import subprocess

    result: dict[str, dict[str, object]] = {}
    for shape in shapes:
        for gemv, cfg in ((True, None), (config is not None, config)):
            code = f"import sys; sys.path.insert(0, 'benchmarks'); import json, dense_gemv_probe as p; " \
                   f"print('RESULT', json.dumps(p.batch1({shape!r}, {gemv}, {cfg!r})))"  # fmt: skip
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
            line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
            key = ("gemv" if cfg is None else label(cfg)) if gemv else "cublas"
            result.setdefault(shape, {})[key] = json.loads(line[-1][7:]) if line else {"error": run.stderr[-1500:]}
            print(shape, key, result[shape][key], flush=True)
    path = Path(os.environ.get("OUT", "/tmp")) / "dense_gemv_e2e.json"
    path.write_text(json.dumps(result, indent=1))


def best_config() -> tuple[int, ...]:
    """The grid's config with the least total time over the shapes of this machine's last sweep
    ($OUT/dense_gemv_probe.json), for ``--config best``."""
    sweep = json.loads((Path(os.environ.get("OUT", "/tmp")) / "dense_gemv_probe.json").read_text())
    totals = {cfg: sum(row[label(cfg)].get("graph_us", float("inf")) for row in sweep.values()) for cfg in GRID}
    best = min(totals, key=totals.__getitem__)
    print("best config over", ",".join(sweep), label(best), round(totals[best], 2), "us", flush=True)
    return best


def main() -> None:
    if "--e2e" in sys.argv:
        cfg = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else None
        e2e(sys.argv[sys.argv.index("--e2e") + 1].split(","), best_config() if cfg == "best" else
            tuple(int(v) for v in cfg.split(",")) if cfg else None)  # fmt: skip
        return
    import quant_kernels_sweep as qs

    sweep = qs.Sweep(240.0)
    out: dict[str, dict[str, object]] = {}
    only = sys.argv[sys.argv.index("--shapes") + 1].split(",") if "--shapes" in sys.argv else list(SHAPES)
    for name, (k, n) in SHAPES.items():
        if name not in only:
            continue
        row = measure(sweep, k, n)
        out[name] = row
        best = min((v["graph_us"], c) for c, v in row.items() if isinstance(v, dict) and "graph_us" in v and c != "cublas")
        print(name, "floor", row["floor_us"], "cublas", row["cublas"]["graph_us"], "best", best, flush=True)
        torch.cuda.empty_cache()
    path = Path(os.environ.get("OUT", "/tmp")) / "dense_gemv_probe.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
