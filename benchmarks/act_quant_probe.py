"""The W8A8 MLP's down-projection input, fused or not (issue 14): SiLU-and-mul writing 16-bit values that the
method's row quantizer then reads, against ``kvik_cuda.act_quant`` writing the codes itself, at the 8B shape's
intermediate width. Codes and scales are checked equal; times are CUDA-graph replays (``do_bench_cudagraph``).

    python benchmarks/act_quant_probe.py --rows 256,2048,8192
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from kvik.quantization.base import RowQuantization
from kvik_cuda.act_quant import silu_and_mul_quantized
from kvik_cuda.fused import FusedSiluAndMul
from kvik_quant.act_quant_kernel import quantize_rows
from kvik_quant.fp8 import ROW_QUANTIZATION as FP8
from kvik_quant.int8 import ROW_QUANTIZATION as INT8
from triton.testing import do_bench_cudagraph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="256,2048,8192")
    ap.add_argument("--intermediate", type=int, default=14336)
    args = ap.parse_args()
    silu = FusedSiluAndMul()
    results = []
    for m in map(int, args.rows.split(",")):
        x = torch.randn(m, 2 * args.intermediate, device="cuda", dtype=torch.bfloat16)
        for name, spec in (("int8", INT8), ("fp8", FP8)):

            def unfused(x: torch.Tensor = x, spec: RowQuantization = spec) -> tuple[torch.Tensor, torch.Tensor]:
                return quantize_rows(silu(x), spec.dtype, spec.qmax, spec.min_scale)

            def fused(x: torch.Tensor = x, spec: RowQuantization = spec) -> tuple[torch.Tensor, torch.Tensor]:
                out = silu_and_mul_quantized(x, spec)
                assert out is not None
                return out

            (a_codes, a_scales), (b_codes, b_scales) = unfused(), fused()
            same = torch.equal(a_scales, b_scales) and torch.equal(a_codes.view(torch.uint8), b_codes.view(torch.uint8))
            row = {
                "rows": m,
                "format": name,
                "same_bits": same,
                "unfused_us": round(1e3 * do_bench_cudagraph(unfused), 1),
                "fused_us": round(1e3 * do_bench_cudagraph(fused), 1),
                "silu_only_us": round(1e3 * do_bench_cudagraph(lambda x=x: silu(x)), 1),
            }
            # Bytes the fused kernel must move at least: gate and up read once, a byte of code written per value.
            row["fused_floor_us"] = round(m * args.intermediate * (2 * 2 + 1) / 4.8e12 * 1e6, 1)
            print("RESULT", json.dumps(row), flush=True)
            results.append(row)
    out = Path(os.environ.get("OUT", "/tmp")) / "act_quant_probe.json"
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
