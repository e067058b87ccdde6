"""Does Triton's warp specialization speed up the INT8 W8A8 GEMM on this GPU (issue 14)?

The committed TMA kernel (``kvik_quant.w8_kernels._int8_gemm_tma_kernel``) issues each int8 warpgroup MMA and
waits for it before the next (Triton 3.9 emits ``pendings=0`` even in the plainest loop), so loads and MMAs
overlap only through the software pipeline. Here the same kernel runs its k-loop as
``tl.range(..., warp_specialize=True)`` (producer warps for the TMA loads, consumer warpgroups for the MMAs),
and a persistent variant walks output tiles in a loop; each is timed against the committed kernel with its
committed tile (``int8_gemm_config``) and against bf16 ``F.linear`` (cuBLAS), on the Llama-3.1-8B linears.
Outputs must equal the committed kernel's bit for bit (int32 accumulation is exact). A variant that does not
compile is recorded with its error and skipped.

    python benchmarks/int8_ws_probe.py --rows 256,2048,8192 [--ws off]
"""

# ruff: noqa: B023  (every lambda is timed immediately, inside its loop iteration)
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import Recorder
from kvik_quant.w8_kernels import _grouped_tile, _rescale_store, int8_gemm, int8_gemm_config

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@triton.jit
def _tile(a_desc, as_ptr, w_desc, ws_ptr, out_ptr, M, N, K, pid_m, pid_n, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    """One output tile: the k-loop over TMA-loaded operand tiles, then the rescaled store."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        a = a_desc.load([pid_m * BLOCK_M, k0])
        w = w_desc.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _rescale_store(acc, as_ptr, ws_ptr, out_ptr, offs_m, offs_n, offs_m < M, offs_n < N, N)


@triton.jit(do_not_specialize=["M"])
def _int8_gemm_ws_kernel(a_desc, as_ptr, w_desc, ws_ptr, out_ptr, M, N, K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         STAGES: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _tile(a_desc, as_ptr, w_desc, ws_ptr, out_ptr, M, N, K, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, WS)


@triton.jit(do_not_specialize=["M"])
def _int8_gemm_persistent_kernel(a_desc, as_ptr, w_desc, ws_ptr, out_ptr, M, N, K,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr, STAGES: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                                 WS: tl.constexpr):  # fmt: skip
    """Output tiles in a loop over a grid of one program per SM (the epilogue of one tile overlaps the next's
    loads), each tile's k-loop as above."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles = tiles_m * tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True, warp_specialize=WS):
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_rows
        pid_n = (tile % per_group) // group_rows
        _tile(a_desc, as_ptr, w_desc, ws_ptr, out_ptr, M, N, K, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, False)


def launch(kind: str, xq, xs, w, wsc, tile: tuple[int, int, int, int, int], ws: bool) -> torch.Tensor:
    bm, bn, bk, warps, stages = tile
    m, k = xq.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=xq.device)
    a = TensorDescriptor.from_tensor(xq, [bm, bk])
    b = TensorDescriptor.from_tensor(w, [bn, bk])
    if kind == "ws":
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _int8_gemm_ws_kernel[grid](a, xs, b, wsc, out, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                   STAGES=stages, WS=ws, num_warps=warps)  # fmt: skip
    else:
        sms = torch.cuda.get_device_properties(xq.device).multi_processor_count
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        programs = min(sms, tiles)
        _int8_gemm_persistent_kernel[(programs,)](a, xs, b, wsc, out, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                  GROUP_M=8, STAGES=stages, NUM_PROGRAMS=programs, WS=ws,
                                                  num_warps=warps)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="256,2048,8192")
    parser.add_argument(
        "--ws",
        default="off,on",
        help="warp specialization settings to try (on hung for 300 s in "
        "Triton 3.6 on the H200, 2026-12-03: no variant finished compiling)",
    )
    args = parser.parse_args()
    record = Recorder("int8_ws_probe")
    record(event="versions", triton=triton.__version__, torch=torch.__version__)
    # TMA allocations for device-side descriptors (persistent kernels may need scratch)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    tiles = {
        "128x128x128w4s3": (128, 128, 128, 4, 3),
        "128x128x128w8s3": (128, 128, 128, 8, 3),
        "128x256x128w8s3": (128, 256, 128, 8, 3),
        "128x128x128w8s4": (128, 128, 128, 8, 4),
        "64x128x128w4s4": (64, 128, 128, 4, 4),
    }
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        wsc = torch.rand(n, device="cuda") / 100
        wb = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        for m in [int(r) for r in args.rows.split(",")]:
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
            xs = torch.rand(m, device="cuda") / 100
            xb = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            cfg = int8_gemm_config(m, n)
            ref = int8_gemm(xq, xs[:, None], w, wsc, torch.bfloat16, cfg)
            row: dict[str, object] = {"shape": name, "m": m, "committed_tile": str(cfg)}
            row["committed_us"] = round(1e3 * triton.testing.do_bench(
                lambda: int8_gemm(xq, xs[:, None], w, wsc, torch.bfloat16, cfg), warmup=25, rep=100), 2)  # fmt: skip
            row["bf16_cublas_us"] = round(1e3 * triton.testing.do_bench(
                lambda: torch.nn.functional.linear(xb, wb), warmup=25, rep=100), 2)  # fmt: skip
            for kind in ("ws", "persistent"):
                for ws in [w == "on" for w in args.ws.split(",")]:
                    for tname, tile in tiles.items():
                        key = f"{kind}{'_WS' if ws else ''}_{tname}"
                        try:
                            out = launch(kind, xq, xs, w, wsc, tile, ws)
                            torch.cuda.synchronize()
                            same = bool(torch.equal(out, ref))
                            us = 1e3 * triton.testing.do_bench(
                                lambda: launch(kind, xq, xs, w, wsc, tile, ws), warmup=25, rep=100)  # fmt: skip
                            row[key] = {"us": round(us, 2), "same_bits": same}
                        except Exception as exc:  # a variant that fails to compile is a result
                            row[key] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            record(event="int8_gemm", **row)


if __name__ == "__main__":
    main()
