"""Run the one-row INT4 GEMV on one of the 8B's linear shapes a few times, for Nsight Compute to profile.

    ncu -k regex:_int4_gemv_row --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats python3 benchmarks/int4_gemv_profile.py --shape gate_up

The config is the shape's ``GEMV_TABLE`` entry or ``ROW_DEFAULT``. Prints the CUDA-event time of one call (no
graphs, so launch cost included).
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gate_up")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    from kvik_quant import int4_pack, splitk
    from kvik_quant.int4 import rtn_quantize
    from kvik_quant.int4_gemv_kernel import gemv_config, int4_gemv

    k, n = SHAPES[args.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    codes, scales, zeros = rtn_quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.02, 128, symmetric=True)
    qw = int4_pack.pack_rows(codes.t())
    s, z = scales.t().to(torch.bfloat16).contiguous(), zeros.t().to(torch.bfloat16).contiguous()
    x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    cfg = gemv_config(n, k, 1)
    sms = splitk.num_sms(x.device)
    for _ in range(args.iters):
        int4_gemv(x, qw, s, z, 128, sms, cfg)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    int4_gemv(x, qw, s, z, 128, sms, cfg)
    end.record()
    torch.cuda.synchronize()
    print(f"{args.shape} K={k} N={n} {cfg}: {start.elapsed_time(end) * 1e3:.1f} us (one eager call)")


if __name__ == "__main__":
    main()
