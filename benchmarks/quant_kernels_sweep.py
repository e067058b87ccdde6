"""Sweep kvik-quant's GEMM paths on one CUDA GPU: bf16 vs the old and new INT4 / FP8 / INT8 paths, small config grids.

From the repository root on the GPU machine (no install needed; about 3-4 minutes on an H200,
mostly Triton compiles)::

    python benchmarks/quant_kernels_sweep.py            # --budget-s 220 by default

For the Llama-3.1-8B linear shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
down 14336->4096) at M = 1, 4, 16, 64, 256, 2048 rows it times every path and config
(microseconds per call) two ways: replayed from a CUDA graph (what decode runs: no launch
overhead) and eager; each call reads a different copy of the weights, enough copies to
stream >= 256 MB, so the L2 (50 MB) does not hold them as it would not in a real step.
Every candidate's output is checked against its torch reference (relative Frobenius error).
Prints a JSON summary and writes it to $OUT/quant_kernels_sweep.json (cwd without $OUT),
rewritten after each shape so a crash keeps what was measured. A part that fails records
its error; when the time budget runs out the remaining candidates are skipped (recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for pkg in ("core", "quantization/quant"):
    sys.path.insert(0, str(ROOT / pkg))  # the checkout's kvik-quant wins over an installed copy

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
ROWS = (1, 4, 16, 64, 256, 2048)
LM_HEAD = (4096, 128256)  # K, N of Llama-3.1-8B's lm_head (kept bf16 by every quantization method)
GROUP = 128
STREAM_BYTES = 256 << 20
# GEMV grids: (block_n, block_k, split_k (0: from the shape), programs per SM, num_warps, num_stages[,
# prefetch, reduce_each, unroll]); GEMV_GRID is the INT4 tl.dot kernel (2..16 rows), W8_GRID's last three knobs shape its
# one-row path. The first entry is the default.
T, F_ = True, False
GEMV_GRID = [(64, 128, 0, 2, 4, 3), (32, 128, 0, 2, 4, 3), (128, 64, 0, 2, 4, 3), (64, 128, 0, 4, 4, 3),
             (64, 128, 0, 8, 4, 3), (64, 128, 1, 2, 4, 3), (128, 128, 0, 4, 4, 3), (64, 256, 0, 4, 4, 3)]  # fmt: skip
# The INT4 one-row kernel (_int4_gemv_row_kernel): (block_n, block_k, programs per SM, num_warps). First: ROW_DEFAULT.
ROW_GRID = [(128, 128, 8, 1), (128, 64, 8, 1), (128, 128, 16, 1), (128, 64, 16, 1), (256, 64, 8, 1), (128, 32, 16, 1),
            (256, 128, 8, 2), (128, 128, 4, 1)]  # fmt: skip
W8_GRID = [(32, 256, 0, 2, 4, 3, T, T, 1),
           # one warp, a few weight rows, 16 bytes of each per thread, reduced once (kvik_cuda.gemv's layout);
           # the last knob: k-steps in flight per iteration (unroll). Run i1 had these without the unroll.
           (2, 512, 0, 16, 1, 1, F_, F_, 1), (2, 512, 0, 8, 1, 1, F_, F_, 4), (2, 512, 0, 16, 1, 1, F_, F_, 4),
           (1, 512, 0, 8, 1, 1, F_, F_, 8), (1, 512, 0, 16, 1, 1, F_, F_, 4), (2, 512, 0, 8, 1, 1, F_, F_, 8),
           (4, 512, 0, 8, 1, 1, F_, F_, 4), (1, 512, 0, 8, 1, 1, F_, F_, 4)]  # fmt: skip
# GEMM grids: (block_m, block_n, block_k, num_warps, num_stages).
GEMM_GRID = [(32, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 64, 64, 4, 4), (128, 128, 128, 8, 3)]
# INT8 GEMM: (block_m, block_n, block_k, num_warps, num_stages, TMA loads?, split-K). Plain loads measured 3-15%
# slower than TMA for every tile in run a6 (2026-12-02), so only the TMA forms stay; run d3 (2026-12-03) adds K
# split over 2-8 programs: at 256 rows the down projection's 64-wide tiles re-read their operands from L2.
I8_GRID = [
    (64, 64, 128, 4, 4, T, 1),
    (64, 128, 128, 4, 4, T, 1),
    (128, 128, 64, 4, 4, T, 1),
    (128, 128, 128, 8, 4, T, 1),
    (128, 256, 128, 8, 3, T, 1),
    (64, 128, 64, 4, 4, T, 1),
    (128, 128, 128, 4, 3, T, 1),
    (64, 128, 128, 4, 4, T, 2),
    (64, 128, 128, 4, 4, T, 4),
    (128, 128, 128, 4, 3, T, 2),
    (128, 128, 128, 4, 3, T, 4),
    (128, 128, 128, 4, 3, T, 8),
    (128, 256, 128, 8, 3, T, 2),
    (128, 256, 128, 8, 3, T, 4),
]


DEVICE = "cuda"  # "cpu" with --dry-run: tiny shapes under TRITON_INTERPRET=1, wall-clock eager timing only
METRIC = "graph_us"
FORMATS = ("bf16", "int4", "fp8", "int8")
ACT = torch.bfloat16  # the dry run uses float16: the CPU interpreter's bf16 tl.dot is wrong


class OutOfTime(Exception):
    pass


class Sweep:
    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def time_us(self, calls: list[Callable[[], Any]]) -> dict[str, float]:
        """Median µs per call, CUDA-graph replayed and eager, over ``calls`` (one per weight copy)."""
        if time.monotonic() > self.deadline:
            raise OutOfTime
        if DEVICE != "cuda":  # the dry run checks the plumbing and numerics; its times mean nothing for a GPU
            begin = time.perf_counter()
            for fn in calls:
                fn()
            return {"eager_us": round((time.perf_counter() - begin) * 1e6 / len(calls), 1)}
        for fn in calls:
            fn()  # compile, allocate split-K counters, warm the allocator
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[0]()
        end.record()
        end.synchronize()
        est_us = max(start.elapsed_time(end) * 1e3, 1.0)
        rounds = max(1, min(64 // len(calls), math.ceil(3000 / est_us / len(calls))))

        def sequence() -> None:
            for _ in range(rounds):
                for fn in calls:
                    fn()

        n = rounds * len(calls)
        eager = []
        for _ in range(5):
            start.record()
            sequence()
            end.record()
            end.synchronize()
            eager.append(start.elapsed_time(end) * 1e3 / n)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            sequence()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            sequence()
        graph.replay()
        replays = []
        for _ in range(5):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            replays.append(start.elapsed_time(end) * 1e3 / n)
        del graph
        return {"graph_us": round(statistics.median(replays), 2), "eager_us": round(statistics.median(eager), 2)}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def copies_for(nbytes: int) -> int:
    return max(1, min(16, math.ceil(STREAM_BYTES / nbytes)))


def candidates(k: int, n: int, gen: torch.Generator) -> tuple[dict[str, Any], Callable[[torch.Tensor], dict]]:
    """Weights for one shape and a function giving, for an activation batch, ``{format: {name: (fn(i), ref)}}``."""
    from kvik_quant import fp8_ops, int4_pack, int8, splitk
    from kvik_quant.act_quant_kernel import quantize_rows
    from kvik_quant.int4 import rtn_quantize
    from kvik_quant.int4_gemv_kernel import GemvConfig, int4_dequantize, int4_gemv
    from kvik_quant.int4_kernel import GemmConfig, int4_gemm
    from kvik_quant.w8_kernels import Int8GemmConfig, W8GemvConfig, int8_gemm, w8a16_gemv

    sms = splitk.num_sms(torch.device(DEVICE))
    w = torch.randn(n, k, device=DEVICE, generator=gen) * 0.02
    w_bf16 = w.to(ACT)
    wq, ws = fp8_ops.quantize_weight_per_channel(w)
    w8, s8 = int8.quantize_rows(w)
    s8 = s8.reshape(-1)
    codes, scales, zeros = rtn_quantize(w, GROUP, symmetric=True)
    qw = int4_pack.pack_rows(codes.t())
    s_t, z_t = scales.t().to(ACT).contiguous(), zeros.t().to(ACT).contiguous()
    int4_ref_w = int4_pack.dequantize_codes(codes.t(), s_t, z_t, GROUP, torch.float32)  # [K, N]
    fp8_ref_w, int8_ref_w = (wq.float() * ws[:, None]).t(), (w8.float() * s8[:, None]).t()
    del w, codes
    bf = [w_bf16] + [w_bf16.clone() for _ in range(copies_for(w_bf16.numel() * 2) - 1)]
    f8 = [wq] + [wq.clone() for _ in range(copies_for(wq.numel()) - 1)]
    i8 = [w8] + [w8.clone() for _ in range(copies_for(w8.numel()) - 1)]
    q4 = [qw] + [qw.clone() for _ in range(copies_for(qw.numel() * 4) - 1)]
    info = {"copies": {"bf16": len(bf), "fp8": len(f8), "int8": len(i8), "int4": len(q4)}}

    def for_rows(x: torch.Tensor) -> dict[str, dict[str, tuple[Any, ...]]]:
        m = x.shape[0]
        xf = x.float()
        out: dict[str, dict[str, tuple[Any, ...]]] = {}
        out["bf16"] = {"F.linear": (lambda i: F.linear(x, bf[i]), xf @ w_bf16.float().t())}
        # INT4: the old kernel and config, the GEMV grid, the GEMM grid, dequantize + cuBLAS.
        r4 = xf @ int4_ref_w
        old_bm, old_bn = (16, 64) if m <= 16 else (32, 64) if m <= 64 else (64, 128)
        old_split = splitk.split_for(math.ceil(m / old_bm) * math.ceil(n / old_bn), k // min(64, GROUP), sms)
        old = GemmConfig(old_bm, old_bn, min(64, GROUP), old_split, num_warps=4, num_stages=3)
        c4: dict[str, Any] = {"old": (lambda i, c=old: int4_gemm(x, q4[i], s_t, z_t, GROUP, c), r4)}
        if m == 1:
            for bn, bk, per_sm, warps in ROW_GRID:
                cfg = GemvConfig(bn, bk, 0, per_sm, warps, 1)
                c4[f"row:{bn}x{bk}:sauto{per_sm}:w{warps}"] = (
                    lambda i, c=cfg: int4_gemv(x, q4[i], s_t, z_t, GROUP, sms, c), r4, cfg)  # fmt: skip
        elif m <= 16:
            if m <= 4:  # the rows kernel (2-4 rows; the default up to int4_gemv_kernel.ROW_MAX_ROWS)
                for bn, bk, per_sm, warps in ROW_GRID:
                    cfg = GemvConfig(bn, bk, 0, per_sm, warps, 1)
                    c4[f"rows:{bn}x{min(bk, 64)}:sauto{per_sm}:w{warps}"] = (
                        lambda i, c=cfg: int4_gemv(x, q4[i], s_t, z_t, GROUP, sms, c, kernel="rows"), r4, cfg)  # fmt: skip
            for bn, bk, sk, per_sm, warps, stages in GEMV_GRID:
                cfg = GemvConfig(bn, bk, sk, per_sm, warps, stages)
                c4[f"gemv:{bn}x{bk}:s{sk or f'auto{per_sm}'}:w{warps}s{stages}"] = (
                    lambda i, c=cfg: int4_gemv(x, q4[i], s_t, z_t, GROUP, sms, c), r4, cfg)  # fmt: skip
        if m >= 16:
            for bm, bn, bk, warps, stages in GEMM_GRID:
                split = splitk.split_for(math.ceil(m / bm) * math.ceil(n / bn), k // bk, sms)
                cfg = GemmConfig(bm, bn, bk, split, warps, stages)
                c4[f"gemm:{bm}x{bn}x{bk}:w{warps}s{stages}"] = (
                    lambda i, c=cfg: int4_gemm(x, q4[i], s_t, z_t, GROUP, c), r4)  # fmt: skip
            c4["dequant+matmul"] = (lambda i: x @ int4_dequantize(q4[i], s_t, z_t, GROUP, x.dtype), r4)
        out["int4"] = c4
        # FP8: W8A8 (act-quant kernel + torch._scaled_mm, the old path) and the W8A16 GEMV grid.
        xq, xs = fp8_ops.quantize_per_token(x)
        c8: dict[str, Any] = {"old": (
            lambda i: fp8_ops.scaled_mm(*quantize_rows(x, fp8_ops.FP8, fp8_ops.FP8_MAX, fp8_ops.MIN_SCALE), f8[i],
                                        ws.view(1, -1), torch.bfloat16),
            (xq.float() * xs) @ fp8_ref_w)}  # fmt: skip
        # INT8: act-quant kernel + torch._int_mm + torch's rescale (old), the Triton GEMM grid, the W8A16 grid.
        xq8, xs8 = int8.quantize_rows(x)
        r8 = (xq8.float() * xs8) @ int8_ref_w
        ci: dict[str, Any] = {
            "old": (lambda i: int8.int8_mm(*quantize_rows(x, torch.int8, 127.0, 1e-10), i8[i], s8, torch.bfloat16), r8)
        }
        if m <= 16:
            for bn, bk, sk, per_sm, warps, stages, pf, red, unroll in W8_GRID:
                name = f"w8a16:{bn}x{bk}:s{sk or f'auto{per_sm}'}:w{warps}s{stages}" + _one_row(m, pf, red, unroll)
                if name in c8:
                    continue
                cfg = W8GemvConfig(bn, bk, sk, per_sm, warps, stages, pf, red, unroll)
                c8[name] = (lambda i, c=cfg: w8a16_gemv(x, f8[i], ws, sms, c), xf @ fp8_ref_w, cfg)
                ci[name] = (lambda i, c=cfg: w8a16_gemv(x, i8[i], s8, sms, c), xf @ int8_ref_w, cfg)
        if m >= 16:
            for bm, bn, bk, warps, stages, tma, split in I8_GRID:
                if m <= 16 and bm > 64:
                    continue
                cfg8 = Int8GemmConfig(bm, bn, bk, 8, warps, stages, tma, split)
                ci[f"triton{':tma' if tma else ''}:{bm}x{bn}x{bk}:w{warps}s{stages}" + (f":k{split}" if split > 1 else "")] = (
                    lambda i, c=cfg8: int8_gemm(*quantize_rows(x, torch.int8, 127.0, 1e-10), i8[i], s8,
                                                torch.bfloat16, c), r8)  # fmt: skip
        out["fp8"], out["int8"] = c8, ci
        return out

    return info, for_rows


def _one_row(m: int, prefetch: bool, reduce_each: bool, unroll: int) -> str:
    """The one-row knobs in a candidate's name (none for m > 1, where they do not apply)."""
    if m > 1:
        return ""
    steps = f":u{unroll}" if unroll > 1 and not prefetch else ""
    return (":prefetch" if prefetch else "") + (":reduce_each" if reduce_each else ":reduce_once") + steps


def run_shape(sweep: Sweep, name: str, k: int, n: int, errors: list[str]) -> dict[str, Any]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    info, for_rows = candidates(k, n, gen)
    result: dict[str, Any] = {"k": k, "n": n, **info}
    for m in ROWS:
        x = torch.randn(m, k, device=DEVICE, generator=gen).to(ACT)
        row: dict[str, Any] = {}
        for fmt, cands in for_rows(x).items():
            if fmt not in FORMATS:
                continue
            measured: dict[str, Any] = {}
            for cand, (fn, ref, *cfg) in cands.items():
                try:
                    copies = info["copies"][fmt]
                    err = rel(fn(0), ref)
                    measured[cand] = {**sweep.time_us([lambda i=i, f=fn: f(i) for i in range(copies)]),
                                      "rel_err": round(err, 5)}  # fmt: skip
                    if cfg:
                        measured[cand]["config"] = dataclasses.asdict(cfg[0])
                except OutOfTime:
                    measured[cand] = {"skipped": "time budget spent"}
                except Exception as exc:
                    measured[cand] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    errors.append(f"{name} m={m} {fmt} {cand}: {type(exc).__name__}: {str(exc)[:200]}")
            ok = {c: v for c, v in measured.items() if METRIC in v and v["rel_err"] < 2e-2}
            best = min(ok, key=lambda c: ok[c][METRIC]) if ok else None
            row[fmt] = {"candidates": measured, "best": best, "best_" + METRIC: ok[best][METRIC] if best else None}
        bf16 = row["bf16"]["best_" + METRIC]
        for fmt in ("int4", "fp8", "int8"):
            if fmt not in row:
                continue
            best_us, old = row[fmt]["best_" + METRIC], row[fmt]["candidates"].get("old", {}).get(METRIC)
            if best_us and bf16:
                row[fmt]["best_vs_bf16"] = round(bf16 / best_us, 2)  # > 1: faster than bf16
            if best_us and old:
                row[fmt]["best_vs_old"] = round(old / best_us, 2)
        result[str(m)] = row
        torch.cuda.empty_cache()
    return result


def summarize(shapes: dict[str, Any], lm_head_us: float | None = None) -> dict[str, Any]:
    """Decode estimate (32 layers' linears at M=1, CUDA graphs; plus the bf16 lm_head when measured) and, per
    format and M, the winning path family."""
    summary: dict[str, Any] = {}
    for fmt in ("bf16", "int4", "fp8", "int8"):
        per_layer = [shapes.get(s, {}).get("1", {}).get(fmt, {}).get("best_" + METRIC) for s, _, _ in SHAPES]
        if all(per_layer):
            ms = 32 * sum(per_layer) / 1e3  # type: ignore[arg-type]
            summary[f"{fmt}_decode_linears_ms_per_token"] = round(ms, 3)
            if lm_head_us:  # attention, norms and sampling are not in either number
                summary[f"{fmt}_decode_linears_and_lm_head_ms_per_token"] = round(ms + lm_head_us / 1e3, 3)
    families: dict[str, dict[str, dict[str, str]]] = {}
    for fmt in ("int4", "fp8", "int8"):
        for s, _, _ in SHAPES:
            for m in ROWS:
                best = shapes.get(s, {}).get(str(m), {}).get(fmt, {}).get("best")
                if best:
                    families.setdefault(fmt, {}).setdefault(str(m), {})[s] = best
    summary["best_by_format_rows_shape"] = families
    # Ready-to-paste GEMV_TABLE / W8_GEMV_TABLE entries: the fastest GEMV config per shape, for one row and
    # for 4..16 rows (the tl.dot variant), when a GEMV won against the other paths of its format.
    tables: dict[str, list[str]] = {"GEMV_TABLE": [], "W8_GEMV_TABLE": []}
    for s, k, n in SHAPES:
        for m, one_row in (("1", True), ("16", False)):
            for fmt, table, cls, key in (("int4", "GEMV_TABLE", "GemvConfig", f"({n}, {k}, {one_row})"),
                                         ("fp8", "W8_GEMV_TABLE", "W8GemvConfig", f"('float8_e4m3fn', {n}, {k}, {one_row})"),
                                         ("int8", "W8_GEMV_TABLE", "W8GemvConfig", f"('int8', {n}, {k}, {one_row})")):  # fmt: skip
                entry = shapes.get(s, {}).get(m, {}).get(fmt, {})
                cfg = entry.get("candidates", {}).get(entry.get("best") or "", {}).get("config")
                if cfg:
                    args = ", ".join(f"{a}={v!r}" for a, v in cfg.items())
                    tables[table].append(f"{key}: {cls}({args}),  # {s}, {entry['best_' + METRIC]} us")
    summary["gemv_tables"] = tables
    return summary


def dry_run() -> None:
    """Tiny shapes and grids on the CPU under the Triton interpreter: every path runs, nothing is timed on a GPU."""
    global DEVICE, METRIC, ACT, SHAPES, ROWS, GEMV_GRID, ROW_GRID, W8_GRID, GEMM_GRID, I8_GRID, GROUP, STREAM_BYTES
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    DEVICE, METRIC, ACT, GROUP, STREAM_BYTES = "cpu", "eager_us", torch.float16, 32, 0
    SHAPES, ROWS = [("tiny", 128, 64)], (1, 4, 16)
    GEMV_GRID = [(32, 32, 0, 2, 4, 2), (64, 64, 1, 2, 4, 1)]
    ROW_GRID = [(32, 32, 2, 1), (64, 64, 2, 2)]
    W8_GRID = [(16, 64, 0, 4, 4, 2, True, False, 1), (16, 64, 0, 2, 4, 2, False, True, 1), (2, 64, 0, 2, 1, 1, False, False, 4)]
    GEMM_GRID, I8_GRID = [(16, 32, 32, 4, 2)], [(16, 32, 64, 4, 2, False, 1), (16, 32, 64, 4, 2, True, 2)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global ROWS, FORMATS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-s", type=float, default=220.0, help="stop starting new measurements after this")
    parser.add_argument("--shapes", default=",".join(s for s, _, _ in SHAPES))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="activation row counts to measure")
    parser.add_argument("--formats", default="bf16,int4,fp8,int8", help="formats to measure (bf16 always runs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, TRITON_INTERPRET=1: checks the sweep itself (CI runs this)")  # fmt: skip
    args = parser.parse_args(argv)
    ROWS = tuple(int(r) for r in args.rows.split(","))
    FORMATS = ("bf16", *args.formats.split(","))
    if args.dry_run:
        dry_run()
    elif not torch.cuda.is_available():
        raise SystemExit("quant_kernels_sweep needs a CUDA GPU (or --dry-run)")
    import triton

    t0 = time.monotonic()
    sweep = Sweep(args.budget_s)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
                              "triton": triton.__version__, "rows": list(ROWS), "shapes": {}, "errors": []}  # fmt: skip
    path = Path(os.environ.get("OUT", "/tmp")) / "quant_kernels_sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if DEVICE == "cuda":  # lm_head stays bf16 under every format: its batch-1 time completes the estimate
        try:
            w = torch.randn(LM_HEAD[1], LM_HEAD[0], device=DEVICE, dtype=ACT) * 0.02
            x = torch.randn(1, LM_HEAD[0], device=DEVICE, dtype=ACT)
            report["lm_head_bf16_m1"] = sweep.time_us([lambda: F.linear(x, w)])
            del w
        except Exception as exc:
            report["errors"].append(f"lm_head: {type(exc).__name__}: {str(exc)[:200]}")
    for name, k, n in SHAPES:
        if name not in args.shapes.split(",") and DEVICE == "cuda":
            continue
        try:
            report["shapes"][name] = run_shape(sweep, name, k, n, report["errors"])
        except Exception:
            report["errors"].append(f"{name}: {traceback.format_exc()[-800:]}")
        report["summary"] = summarize(report["shapes"], report.get("lm_head_bf16_m1", {}).get("graph_us"))
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        path.write_text(json.dumps(report, indent=1))
    from kvik_quant import fallback

    report["fallbacks"] = sorted(fallback.broken())
    report["numerics_ok"] = not any(
        v.get("rel_err", 0) >= 2e-2
        for shape in report["shapes"].values() for m in ROWS for fmt in shape.get(str(m), {}).values()
        for v in fmt["candidates"].values()
    )  # fmt: skip
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({"summary": report.get("summary"), "numerics_ok": report["numerics_ok"],
                      "errors": report["errors"][:20], "elapsed_s": report["elapsed_s"]}, indent=1))  # fmt: skip
    print(f"full results: {path}")
    return report


if __name__ == "__main__":
    main()
